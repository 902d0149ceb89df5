"""Per-family training adapters: the few things a training loop must know about a model family.

An adapter loads the family's pipeline, encodes prompts and images with the pipeline's own steps (so training
sees exactly what sampling sees), runs the trainable model on noisy latents, names the default LoRA targets and
the blocks to checkpoint, chooses how sigmas are sampled and losses weighted, and makes and saves samples.
Everything else (data, optimisation, checkpoints) is family-independent: FLUX.1 trains on images, Wan 2.1/2.2 on
videos and images, through the same loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "ADAPTERS",
    "FluxTrainingAdapter",
    "TrainingAdapter",
    "WanTrainingAdapter",
    "adapter_for",
    "family_of_model",
    "get_adapter",
]


class TrainingAdapter:
    """The family hook. Conditions and latents are dicts/tensors with the batch on dim 0, so they can be cached."""

    name: ClassVar[str] = ""
    trainable_model: ClassVar[str] = "dit"  # the component LoRA attaches to
    default_lora_targets: ClassVar[tuple[str, ...]] = ()
    default_timestep_sampling: ClassVar[str] = "uniform"
    default_loss_weighting: ClassVar[str] = "none"
    default_size: ClassVar[tuple[int, int]] = (1024, 1024)  # (height, width) when the config leaves them unset
    default_num_frames: ClassVar[int | None] = None  # None: the family trains on images
    temporal_compression: ClassVar[int] = 1  # clips hold 1 + k * this many frames
    encoders: ClassVar[tuple[str, ...]] = ()  # components only needed to encode or sample (freed when caching)
    sigma_shift: float | None = None  # None: the family schedule's own shift

    def load_pipeline(self, model: Any, device: torch.device, dtype: torch.dtype, vram: Any = None) -> Any:
        raise NotImplementedError

    def check(self, pipe: Any, height: int, width: int, num_frames: int | None) -> None:
        """Raise a ``ValueError`` naming the setting at fault when the loaded model cannot train at this shape."""

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_pixel_conditions(
        self, pipe: Any, pixels: torch.Tensor, latents: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Conditions taken from the sample itself (an image-to-video model's first frame), given its pixels and
        the latents ``encode_images`` made of them; caption dropout leaves them alone."""
        return {}

    def sequence_length(self, latents: torch.Tensor) -> int:
        raise NotImplementedError

    def loss_mask(self, conditions: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor | None:
        """Which latent values the loss counts (broadcastable to ``latents``); None: all of them."""
        return None

    def estimated_tokens(self, pipe: Any, height: int, width: int, num_frames: int | None) -> int:
        """Tokens one sample puts through the trained model (for the memory estimate)."""
        raise NotImplementedError

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, conditions: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks gradient checkpointing wraps."""
        raise NotImplementedError

    def sample(
        self,
        pipe: Any,
        prompt: str,
        seed: int,
        height: int,
        width: int,
        steps: int,
        num_frames: int | None = None,
        reference: torch.Tensor | None = None,
    ) -> Any:
        """One sample during training; ``reference`` is a dataset item's pixels (image-to-video models start from
        its first frame)."""
        raise NotImplementedError

    def save_sample(self, result: Any, stem: Path) -> Path:
        path = stem.with_suffix(".png")
        result.save(path)
        return path

    def scheduler(self, pipe: Any) -> Any:
        raise NotImplementedError

    def sigma_range(self, pipe: Any) -> tuple[float, float] | None:
        """The noise levels this run trains at (None: all of them)."""
        return None

    def sample_sigmas(
        self, pipe: Any, latents: torch.Tensor, generator: torch.Generator, sampling: str
    ) -> torch.Tensor:
        return self.scheduler(pipe).training_sigmas(
            latents.shape[0],
            generator=generator,
            image_sequence_length=self.sequence_length(latents),
            sampling=sampling,
            shift=self.sigma_shift,
            sigma_range=self.sigma_range(pipe),
        )

    def loss_weight(self, sigmas: torch.Tensor, weighting: str) -> torch.Tensor:
        if weighting == "none":
            return torch.ones_like(sigmas, dtype=torch.float32)
        if weighting == "bell":
            from ds_pipelines.schedulers import FlowMatchScheduler

            return FlowMatchScheduler.training_weight(sigmas)
        raise ValueError(f"loss_weighting={weighting!r}; use 'none' or 'bell'")


class FluxTrainingAdapter(TrainingAdapter):
    """FLUX.1 (dev, schnell, Krea; the DiT in BFL naming).

    Default LoRA targets are every Linear inside the double and single blocks (attention q/k/v and output,
    MLPs and the modulation projections), as kohya and ComfyUI FLUX LoRAs cover; sigmas are logit-normal and
    shifted by FLUX.1's resolution-dependent mu (dev) as its sampling schedule is, with a plain MSE.
    """

    name = "flux.1"
    default_lora_targets = (
        "double_blocks.*.img_attn.qkv",
        "double_blocks.*.img_attn.proj",
        "double_blocks.*.txt_attn.qkv",
        "double_blocks.*.txt_attn.proj",
        "double_blocks.*.img_mlp.0",
        "double_blocks.*.img_mlp.2",
        "double_blocks.*.txt_mlp.0",
        "double_blocks.*.txt_mlp.2",
        "double_blocks.*.img_mod.lin",
        "double_blocks.*.txt_mod.lin",
        "single_blocks.*.linear1",
        "single_blocks.*.linear2",
        "single_blocks.*.modulation.lin",
    )
    default_timestep_sampling = "logit_normal"
    default_loss_weighting = "none"
    encoders = ("text_encoder", "text_encoder_2", "vae")

    def __init__(self, guidance: float = 1.0, t5_sequence_length: int | None = None, sigma_shift: float | None = None):
        self.guidance = guidance
        self.t5_sequence_length = t5_sequence_length
        self.sigma_shift = sigma_shift

    def load_pipeline(self, model: Any, device: torch.device, dtype: torch.dtype, vram: Any = None) -> Any:
        from ds_pipelines import FluxImagePipeline

        if isinstance(model, dict):
            return FluxImagePipeline.from_pretrained(
                model_configs=model, device=device, torch_dtype=dtype, vram=vram, progress_bar=False
            )
        return FluxImagePipeline.from_pretrained(
            model, device=device, torch_dtype=dtype, vram=vram, progress_bar=False
        )

    def check(self, pipe: Any, height: int, width: int, num_frames: int | None) -> None:
        if num_frames not in (None, 1):
            raise ValueError(f"num_frames={num_frames}: FLUX.1 trains on images; leave num_frames unset")

    def estimated_tokens(self, pipe: Any, height: int, width: int, num_frames: int | None) -> int:
        text_tokens = self.t5_sequence_length or pipe.default_t5_sequence_length()
        return height * width // 256 + text_tokens

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        embedding = pipe.encode_prompt(list(prompts), self.t5_sequence_length)
        return {"text": embedding.text, "pooled": embedding.pooled}

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        return pipe.encode_image(pixels)

    def sequence_length(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def scheduler(self, pipe: Any) -> Any:
        from ds_pipelines.schedulers import FlowMatchScheduler

        guidance_embed = pipe.dit.config.guidance_embed if pipe is not None else True
        return FlowMatchScheduler("flux.1" if guidance_embed else "flux.1-schnell")

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, conditions: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        batch, _, height, width = noisy.shape
        device = noisy.device
        img_ids = _image_ids(height // 2, width // 2, device)[None].expand(batch, -1, -1)
        text = conditions["text"]
        text_ids = torch.zeros(batch, text.shape[1], 3, device=device)
        config = _unwrap(model).config
        guidance = None
        if config.guidance_embed:
            guidance = torch.full((batch,), self.guidance, device=device, dtype=noisy.dtype)
        velocity = model(
            _patchify(noisy), img_ids, text, text_ids, sigmas.to(device, noisy.dtype), conditions["pooled"], guidance
        )
        return _unpatchify(velocity, height, width)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        model = _unwrap(model)
        return [*model.double_blocks, *model.single_blocks]

    def sample(
        self,
        pipe: Any,
        prompt: str,
        seed: int,
        height: int,
        width: int,
        steps: int,
        num_frames: int | None = None,
        reference: torch.Tensor | None = None,
    ) -> Any:
        return pipe(prompt, seed=seed, height=height, width=width, num_inference_steps=steps)


class WanTrainingAdapter(TrainingAdapter):
    """Wan 2.1 and 2.2 (the DiT in the official Wan-Video naming), on videos and on images as one-frame clips.

    Default LoRA targets are the attention projections (self and cross: q, k, v, o) and both FFN Linears of every
    block, as DiffSynth-Studio's and musubi-tuner's Wan LoRAs cover. Sigmas are drawn uniformly and shifted by 5
    (the official training grid; ``sigma_shift`` overrides it), and the loss takes DiffSynth-Studio's bell-shaped
    weight over sigma. Image-to-video models (I2V, FLF2V) are conditioned on each clip's first (and last) frame
    exactly as sampling conditions them; ``first_frame_conditioning`` trains Wan2.2-TI2V-5B's image-to-video mode
    (the first latent frame of each clip given clean at timestep 0 and left out of the loss, as sampling pins it;
    images train its text-to-video mode). Wan2.2 A14B
    has two experts: a run trains one (``expert``), only at the
    noise levels that expert samples (at or above the boundary for ``"high_noise"``, below it for
    ``"low_noise"``); the other stays frozen and is used only for samples.
    """

    name = "wan"
    default_lora_targets = (
        *(f"blocks.*.{attention}.{projection}" for attention in ("self_attn", "cross_attn") for projection in "qkvo"),
        "blocks.*.ffn.0",
        "blocks.*.ffn.2",
    )
    default_timestep_sampling = "uniform"
    default_loss_weighting = "bell"
    default_size = (480, 832)
    default_num_frames = 81
    temporal_compression = 4
    encoders = ("text_encoder", "image_encoder", "vae")

    def __init__(
        self,
        expert: str | None = None,
        sigma_shift: float | None = None,
        boundary: float | None = None,
        first_frame_conditioning: bool = False,
    ):
        if expert not in (None, "high_noise", "low_noise"):
            raise ValueError(f"expert={expert!r}; use 'high_noise' or 'low_noise' (Wan2.2 A14B), or None")
        if boundary is not None and not 0 < boundary < 1:
            raise ValueError(f"boundary={boundary!r} must be in (0, 1) (a fraction of 1000 timesteps)")
        self.expert, self.sigma_shift, self.boundary = expert, sigma_shift, boundary
        self.first_frame_conditioning = first_frame_conditioning
        self.trainable_model = "dit2" if expert == "low_noise" else "dit"
        if expert is not None:  # the other expert is frozen: stored like the encoders, needed only for samples
            self.encoders = (*type(self).encoders, "dit" if expert == "low_noise" else "dit2")

    def load_pipeline(self, model: Any, device: torch.device, dtype: torch.dtype, vram: Any = None) -> Any:
        from ds_pipelines import WanVideoPipeline

        if isinstance(model, Mapping):
            return WanVideoPipeline.from_pretrained(
                model_configs=model, device=device, torch_dtype=dtype, vram=vram, progress_bar=False
            )
        return WanVideoPipeline.from_pretrained(model, device=device, torch_dtype=dtype, vram=vram, progress_bar=False)

    def check(self, pipe: Any, height: int, width: int, num_frames: int | None) -> None:
        from ds_pipelines.wan_video import check_video_size

        pair = getattr(pipe, "dit2", None) is not None
        if pair and self.expert is None:
            raise ValueError(
                "this Wan2.2 A14B model has two experts; set TrainingConfig.expert (--expert) to 'high_noise' or "
                "'low_noise' and train one per run"
            )
        if self.expert is not None and not pair:
            raise ValueError(f"expert={self.expert!r} needs a Wan2.2 A14B pair (dit and dit2); this model has one DiT")
        dit = getattr(pipe, self.trainable_model)
        check_video_size(height, width, num_frames or 1, pipe.vae.spatial_compression * dit.config.patch_size[1])
        if self.first_frame_conditioning and dit.config.model_type != "ti2v":
            raise ValueError(
                f"first_frame_conditioning trains Wan2.2-TI2V-5B's image-to-video mode; this DiT is "
                f"{dit.config.model_type} (I2V and FLF2V models are conditioned on their frames anyway)"
            )
        if self.first_frame_conditioning and (num_frames or 1) < 5:
            raise ValueError("first_frame_conditioning needs clips of at least 5 frames (one to give, four to learn)")
        if getattr(dit.config, "has_image_position_embedding", False) and (num_frames or 1) < 5:
            raise ValueError("a first-last-frame (FLF2V) model trains on clips of at least 5 frames; raise num_frames")

    def _image_to_video(self, pipe: Any) -> bool:
        dit = getattr(pipe, self.trainable_model)
        return dit.config.in_dim > pipe.vae.z_dim

    def estimated_tokens(self, pipe: Any, height: int, width: int, num_frames: int | None) -> int:
        dit = getattr(pipe, self.trainable_model)
        _, patch_h, patch_w = dit.config.patch_size
        spatial = pipe.vae.spatial_compression
        latent_frames = ((num_frames or 1) - 1) // pipe.vae.temporal_compression + 1
        return latent_frames * (height // spatial // patch_h) * (width // spatial // patch_w)

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"context": torch.cat([pipe.encode_prompt(prompt) for prompt in prompts])}

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 4:  # (B, 3, H, W) images are one-frame clips
            pixels = pixels[:, :, None]
        # Untiled: training latents are exact (tiling blends overlaps, which is only an approximation).
        return torch.cat([pipe.encode_video(clip[None], tiled=False) for clip in pixels])

    def encode_pixel_conditions(
        self, pipe: Any, pixels: torch.Tensor, latents: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        dit = getattr(pipe, self.trainable_model)
        if pixels.dim() == 4:
            pixels = pixels[:, :, None]
        both = getattr(dit.config, "has_image_position_embedding", False)  # FLF2V: first and last frame
        conditions: dict[str, list[torch.Tensor]] = {}
        if self.first_frame_conditioning and pixels.shape[2] > 1:
            # TI2V: the causal VAE's first latent frame is the first frame's alone, so it is the clip's. Images
            # (one-frame clips) have nothing after it to learn: they train the model's text-to-video mode.
            conditions["first_frame"] = [latents[:, :, :1]]
        for clip in pixels:
            first, last = clip[None, :, 0], (clip[None, :, -1] if both else None)
            if self._image_to_video(pipe):
                frames = clip.shape[1]
                conditions.setdefault("condition", []).append(pipe.frame_condition(first, last, frames, tiled=False))
            if dit.config.has_image_input:
                images = [first, last] if both else [first]
                conditions.setdefault("clip_feature", []).append(pipe.encode_clip(images))
        return {key: torch.cat(values) for key, values in conditions.items()}

    def sequence_length(self, latents: torch.Tensor) -> int:
        frames, height, width = latents.shape[-3:]
        return frames * (height // 2) * (width // 2)

    def scheduler(self, pipe: Any) -> Any:
        from ds_pipelines.schedulers import FlowMatchScheduler

        return FlowMatchScheduler("wan")

    def sigma_range(self, pipe: Any) -> tuple[float, float] | None:
        if self.expert is None:
            return None
        from ds_pipelines.wan_video import DEFAULT_BOUNDARY, I2V_BOUNDARY

        boundary = self.boundary or getattr(pipe, "boundary", None)
        if boundary is None:
            boundary = I2V_BOUNDARY if self._image_to_video(pipe) else DEFAULT_BOUNDARY
        return (boundary, 1.0) if self.expert == "high_noise" else (0.0, boundary)

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, conditions: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        timesteps = sigmas.to(noisy.device, torch.float32) * 1000  # the official 0..1000 scale
        first = conditions.get("first_frame")
        if first is not None:  # TI2V image-to-video: the first frame is given clean, its tokens at timestep 0
            noisy = torch.cat([first.to(noisy.dtype), noisy[:, :, 1:]], dim=2)
            _, patch_h, patch_w = _unwrap(model).config.patch_size
            frames, height, width = noisy.shape[2:]
            per_token = timesteps[:, None, None, None].expand(-1, frames, height // patch_h, width // patch_w).clone()
            per_token[:, 0] = 0
            timesteps = per_token.flatten(1)
        return model(
            noisy,
            timesteps,
            conditions["context"],
            clip_feature=conditions.get("clip_feature"),
            condition=conditions.get("condition"),
        )

    def loss_mask(self, conditions: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor | None:
        if "first_frame" not in conditions:
            return None
        mask = torch.ones(1, 1, latents.shape[2], 1, 1, device=latents.device)
        mask[:, :, 0] = 0  # the given frame teaches nothing
        return mask

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_unwrap(model).blocks)

    def sample(
        self,
        pipe: Any,
        prompt: str,
        seed: int,
        height: int,
        width: int,
        steps: int,
        num_frames: int | None = None,
        reference: torch.Tensor | None = None,
    ) -> Any:
        from ds_pipelines.media import tensor_to_images

        images: dict[str, Any] = {}
        conditioned = self._image_to_video(pipe) or self.first_frame_conditioning
        if conditioned and reference is not None:
            clip = reference if reference.dim() == 4 else reference[:, None]
            images["input_image"] = tensor_to_images(clip[None, :, 0])[0]
            if getattr(getattr(pipe, self.trainable_model).config, "has_image_position_embedding", False):
                images["end_image"] = tensor_to_images(clip[None, :, -1])[0]
        return pipe(
            prompt,
            seed=seed,
            height=height,
            width=width,
            num_frames=num_frames or 1,
            num_inference_steps=steps,
            **images,
        )

    def save_sample(self, result: Any, stem: Path) -> Path:
        from ds_pipelines.media import save_video

        if len(result) == 1:
            return super().save_sample(result[0], stem)
        return save_video(result, stem.with_suffix(".mp4"), progress_bar=False)


def _image_ids(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """FLUX.1 image token positions ``(0, row, col)`` in row-major order (as ``grid_positions((1, h, w))``)."""
    grid = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32), torch.arange(cols, dtype=torch.float32), indexing="ij"
    )
    return torch.stack([torch.zeros(rows, cols), *grid], dim=-1).reshape(-1, 3).to(device)


def _patchify(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents to (B, H/2 * W/2, C * 4) tokens, channel-major within a 2x2 patch (FLUX.1 packing)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _unpatchify(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP/FSDP/peft wrappers (they keep it in ``.module`` or ``.base_model.model``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "base_model") and hasattr(model.base_model, "model"):
            model = model.base_model.model
        else:
            return model


ADAPTERS: dict[str, Callable[..., TrainingAdapter]] = {"flux.1": FluxTrainingAdapter, "wan": WanTrainingAdapter}
_FAMILY_OF_PIPELINE = {"FluxImagePipeline": "flux.1", "WanVideoPipeline": "wan"}


def get_adapter(family: str = "flux.1", **options: Any) -> TrainingAdapter:
    if family not in ADAPTERS:
        raise ValueError(f"no training adapter for family {family!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[family](**options)


def family_of_model(model: Any) -> str:
    """The training family of a preset, model id, local folder or file, or ``{component: source}`` mapping.

    Presets and ids are looked up in the installed families; local files are recognised from their headers
    (ds-loader detection). What cannot be recognised is taken for FLUX.1, whose loader then names what is wrong.
    """
    from ds_pipelines.catalog import pipeline_for

    if isinstance(model, Mapping):
        sources = [model.get("dit"), *model.values()]
        paths = [getattr(source, "path", source) for source in sources if source is not None]
        paths = [path[0] if isinstance(path, list | tuple) and path else path for path in paths]
        model = next((path for path in paths if isinstance(path, str | os.PathLike)), None)
    class_name, _ = pipeline_for(model)
    return _FAMILY_OF_PIPELINE.get(class_name, "flux.1")


def adapter_for(config: Any) -> TrainingAdapter:
    """The adapter a ``TrainingConfig`` asks for: its ``family`` (None: recognised from ``model``) and the options
    that family reads from the config."""
    family = config.family or family_of_model(config.model)
    if family == "wan":
        if config.guidance != 1.0 or config.t5_sequence_length is not None:
            raise ValueError("guidance and t5_sequence_length are FLUX.1 settings; Wan has neither")
        return get_adapter(
            "wan",
            expert=config.expert,
            sigma_shift=config.sigma_shift,
            boundary=config.boundary,
            first_frame_conditioning=config.first_frame_conditioning,
        )
    if config.expert is not None or config.boundary is not None or config.first_frame_conditioning:
        raise ValueError(
            f"expert, boundary and first_frame_conditioning are Wan settings; {family} has one image model to train"
        )
    return get_adapter(
        family, guidance=config.guidance, t5_sequence_length=config.t5_sequence_length, sigma_shift=config.sigma_shift
    )
