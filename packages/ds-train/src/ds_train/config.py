"""What a training run is: one dataclass of plain values, so the CLI, scripts and notebooks build the same thing."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["TrainingConfig", "TrainingResult"]

_MODES = ("lora", "full")
_PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class TrainingConfig:
    """Everything a run needs; the defaults train a FLUX.1 LoRA at 1024x1024.

    model: anything the family pipeline's ``from_pretrained`` accepts (preset, model id, local folder, or a
        ``{component: path}`` mapping). family: a registered family id (``"flux.1"``, ``"wan"``, ...; checked when
        the run starts); None recognises it from ``model``'s DiT. data: a folder of images (and, for video
        families, videos) with same-name ``.txt`` captions, or a ``metadata.csv/.json/.jsonl`` file.
    height/width: the training size; None takes the family's (FLUX.1 1024x1024, Wan 480x832). num_frames: frames
        per video clip (Wan; None: 81, the released models' length; images are one-frame clips). frame_stride:
        take every n-th frame of a video. sigma_shift: the shift of the training sigmas (None: the family's:
        FLUX.1's resolution-dependent one, Wan's 5). output: the run folder (checkpoints/, samples/, log.csv,
        loss.png and the final weights: ``lora.safetensors`` or ``<component>.safetensors``).
    family_options: settings of the family's training adapter, as its ``options`` declare them (an option another
        family takes is an error naming the ones this family takes). FLUX.1: ``guidance`` (embedded guidance while
        training, default 1.0), ``t5_sequence_length``. Wan: ``expert`` (which Wan2.2 A14B expert to train,
        ``"high_noise"`` or ``"low_noise"``, at the noise levels it samples on either side of ``boundary``, None:
        the release's), ``first_frame_conditioning`` (train Wan2.2-TI2V-5B's image-to-video mode).
    mode: ``"lora"`` trains peft adapters on the family's LoRA model (the DiT); ``"full"`` trains the
        components in ``trainable``. lora_targets: glob patterns over module names (``"double_blocks.*.img_attn.qkv"``)
        or plain suffixes (``"qkv"``); None takes the family's default.
    mixed_precision: ``"bf16"``/``"fp16"`` run the forward pass under autocast with float32 trainable weights;
        frozen weights are stored in ``weight_dtype`` (None: bfloat16 with mixed precision, else float32).
    timestep_sampling / loss_weighting: None takes the family's choice (FLUX.1: shifted logit-normal sigmas, a
        plain MSE); ``"uniform"``/``"logit_normal"`` and ``"none"``/``"bell"`` override it.
    fp8_frozen: store frozen Linear weights in FP8 (LoRA mode; computed in ``weight_dtype``).
    stream_frozen: keep frozen weights in CPU RAM and stream them to the device layer by layer (ds-vram);
        ``vram_limit`` GiB of them may stay resident.
    cache: encode prompts and images once into ``<output>/cache/*.safetensors`` and train from those files
        (text encoders and VAE are then freed). skip_broken: drop broken dataset rows with a warning instead of
        stopping with a list of them.
    """

    model: str | os.PathLike | Mapping[str, Any] = "flux.1-dev"
    family: str | None = None
    data: str | os.PathLike = ""
    output: str | os.PathLike = "runs/train"
    mode: str = "lora"
    trainable: tuple[str, ...] = ("dit",)
    # LoRA
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] | None = None
    lora_dropout: float = 0.0
    lora_init: str | os.PathLike | None = None  # start from this LoRA file (any format pipe.load_lora reads)
    lora_format: str = "comfyui"  # format of the final lora.safetensors: comfyui | kohya | diffusers
    trigger_words: tuple[str, ...] = ()
    # optimisation
    steps: int = 1000
    batch_size: int = 1
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes)
    lr_scheduler: str = "constant"  # constant | linear | cosine
    lr_warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    # data
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    frame_stride: int = 1
    buckets: bool = False  # aspect-ratio buckets with height*width pixels each instead of a centre crop
    repeats: int = 1
    skip_broken: bool = False
    caption_dropout: float = 0.0
    num_workers: int = 0
    # family knobs
    timestep_sampling: str | None = None
    loss_weighting: str | None = None
    sigma_shift: float | None = None
    family_options: dict[str, Any] = field(default_factory=dict)  # the family adapter's own settings
    # precision and memory
    seed: int = 0
    mixed_precision: str = "bf16"
    weight_dtype: str | None = None
    device: str | None = None
    gradient_checkpointing: bool = False
    offload_activations: bool = False
    fp8_frozen: bool = False
    stream_frozen: bool = False
    vram_limit: float | None = None
    cache: bool = False
    # checkpoints, samples and logs
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    sample_every: int = 0
    sample_at: tuple[int, ...] = ()
    sample_prompts: tuple[str, ...] = ()
    sample_seed: int = 0
    sample_inference_steps: int = 20
    log_every: int = 1
    tensorboard: bool = True
    print_memory_estimate: bool = True
    progress_bar: bool = True

    def __post_init__(self) -> None:
        self.trainable = tuple(self.trainable)
        self.sample_prompts = (
            (self.sample_prompts,) if isinstance(self.sample_prompts, str) else tuple(self.sample_prompts)
        )
        self.trigger_words = (
            (self.trigger_words,) if isinstance(self.trigger_words, str) else tuple(self.trigger_words)
        )
        self.sample_at = tuple(self.sample_at)
        if isinstance(self.family_options, Mapping):
            self.family_options = dict(self.family_options)
        if self.lora_targets is not None:
            self.lora_targets = (
                (self.lora_targets,) if isinstance(self.lora_targets, str) else tuple(self.lora_targets)
            )
        self.validate()

    def validate(self) -> None:
        """Raise a ``ValueError`` naming the field at fault."""
        self._validate_finite()
        if self.mode not in _MODES:
            raise ValueError(f"TrainingConfig.mode={self.mode!r}; use one of {', '.join(_MODES)}")
        if self.mixed_precision not in _PRECISIONS:
            raise ValueError(f"TrainingConfig.mixed_precision={self.mixed_precision!r}; use one of {_PRECISIONS}")
        for name in ("steps", "batch_size", "gradient_accumulation", "lora_rank", "repeats", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingConfig.{name}={value!r} must be an integer >= 1")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 16 or value % 16):
                raise ValueError(f"TrainingConfig.{name}={value!r} must be a multiple of 16 (at least 16)")
        if self.mode == "full" and not self.trainable:
            raise ValueError("TrainingConfig.trainable is empty; full mode needs components to train, e.g. ('dit',)")
        if self.mode == "full" and (self.fp8_frozen or self.stream_frozen):
            raise ValueError(
                "fp8_frozen/stream_frozen apply to frozen weights; full mode trains them (use mode='lora')"
            )
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"TrainingConfig.caption_dropout={self.caption_dropout!r} must be in [0, 1)")
        if self.lora_format not in ("comfyui", "kohya", "diffusers"):
            raise ValueError(f"TrainingConfig.lora_format={self.lora_format!r}; use comfyui, kohya or diffusers")
        if self.checkpoint_every < 0 or self.sample_every < 0:
            raise ValueError("checkpoint_every and sample_every must be >= 0 (0 turns them off)")
        self._validate_family_settings()

    def _validate_finite(self) -> None:
        """NaN or infinity in any number (a learning rate, a scale) would train garbage or write invalid JSON."""
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"TrainingConfig.{item.name}={value!r} must be a finite number")

    def _validate_family_settings(self) -> None:
        """The video and family fields (frames, the family's options, the sigma shift)."""
        if self.num_frames is not None and (not isinstance(self.num_frames, int) or self.num_frames < 1):
            raise ValueError(f"TrainingConfig.num_frames={self.num_frames!r} must be an integer >= 1")
        if not isinstance(self.frame_stride, int) or self.frame_stride < 1:
            raise ValueError(f"TrainingConfig.frame_stride={self.frame_stride!r} must be an integer >= 1")
        if self.family is not None and (not isinstance(self.family, str) or not self.family):
            raise ValueError(
                f"TrainingConfig.family={self.family!r}; use a registered family's id (ds_pipelines.list_families()) "
                "or None"
            )
        if not isinstance(self.family_options, Mapping) or not all(isinstance(k, str) for k in self.family_options):
            raise ValueError(
                f"TrainingConfig.family_options={self.family_options!r} must map option names to values, "
                "e.g. {'expert': 'high_noise'}"
            )
        if self.sigma_shift is not None and self.sigma_shift <= 0:
            raise ValueError(f"TrainingConfig.sigma_shift={self.sigma_shift!r} must be > 0")

    @property
    def output_path(self) -> Path:
        return Path(self.output)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (paths as strings), written to ``<output>/config.json``."""
        values = asdict(self)
        if isinstance(self.model, Mapping):
            values["model"] = {k: str(v) for k, v in self.model.items()}
        for key, value in values.items():
            if isinstance(value, os.PathLike):
                values[key] = os.fspath(value)
        return values


@dataclass
class TrainingResult:
    """What ``train`` returns.

    weights_path: the final weights, ``lora.safetensors`` (LoRA mode, in ``config.lora_format``) or, in full
    mode, the first trained component's file (``dit.safetensors``, the model's own key names, loadable by the
    family's loader); ``component_paths`` lists every trained component's file.
    """

    output: Path
    weights_path: Path | None
    steps: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    component_paths: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False
    samples: list[Path] = field(default_factory=list)
    dropped_rows: int = 0
