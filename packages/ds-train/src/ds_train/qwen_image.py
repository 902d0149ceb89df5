"""Qwen-Image's training adapter (the family registry names it: ``ds_train.qwen_image:QwenImageTrainingAdapter``).

Three kinds of run, chosen by the dataset's columns and two family options:

- text to image (Qwen-Image, -2512): a folder or metadata table of images and captions;
- editing (Qwen-Image-Edit, -2509, -2511): metadata rows with the target ``image``, its ``edit_image`` (one, or
  several: a JSON list or ``edit_image_2``, ...) and the instruction as the caption. Each edit image goes through
  the pipeline's own edit path: Qwen2.5-VL sees it with the instruction (the edit template), and its clean VAE
  latents follow the target's tokens in the DiT (Edit-2511's ``zero_cond_t`` DiT runs them at t = 0 by itself);
- ControlNet (a blockwise ControlNet loaded with ``controlnet=FILE``): rows with a ``control_image`` (and, for the
  Inpaint ControlNet, an ``inpaint_mask``; its picture is the ``control_image``, or the target when that is absent).
  ``train_controlnet=True`` trains the ControlNet itself with the DiT frozen (``mode="full"`` with
  ``trainable=("controlnet",)``, or a LoRA on it); without it the ControlNet is applied frozen while a LoRA trains the
  DiT, as DiffSynth-Studio's ControlNet LoRA scripts do.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from ds_pipelines.base import unwrap_model

from .family import TrainingAdapter

__all__ = ["TRAINING_MU", "QwenImageTrainingAdapter"]

# DiffSynth-Studio trains Qwen-Image on its "Qwen-Image" schedule of 1000 steps without a sequence length, where
# the exponential shift falls back to mu = 0.8 (shift e^0.8 = 2.23) at every resolution, then the terminal stretch to
# 0.02. Sampling uses mu from the image's token count instead (0.69 at 1024 x 1024).
TRAINING_MU = 0.8
ROLES = ("edit_image", "control_image", "inpaint_mask")


class QwenImageTrainingAdapter(TrainingAdapter):
    """Qwen-Image, its Edit models and blockwise ControlNets (see the module).

    Default LoRA targets are DiffSynth-Studio's for Qwen-Image: the attention projections of both streams
    (``to_q/k/v``, ``add_q/k/v_proj``, ``to_out.0``, ``to_add_out``), the second Linear of both MLPs and both
    modulation Linears of every block. Sigmas are drawn uniformly and shifted as upstream trains (``TRAINING_MU``, then
    the terminal stretch to 0.02; ``sigma_shift`` replaces the shift), weighted by upstream's bell over sigma.
    Prompts keep their own length; a batch pads them and the mask hides the padding.
    """

    family = "qwen-image"
    options: ClassVar[Mapping[str, tuple[Any, str]]] = {
        "controlnet": (
            str,
            "a blockwise ControlNet file to load beside the model; the dataset's control_image feeds it",
        ),
        "train_controlnet": (bool, "train the loaded ControlNet (DiT frozen) instead of the DiT"),
        "edit_image_area": (int, "pixels each edit image is VAE-encoded at (default: the pipeline's, about 1 MP)"),
    }
    default_lora_targets = tuple(
        f"transformer_blocks.*.{name}"
        for name in (
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_out.0",
            "attn.to_add_out",
            "img_mlp.net.2",
            "img_mod.1",
            "txt_mlp.net.2",
            "txt_mod.1",
        )
    )
    default_timestep_sampling = "uniform"
    default_loss_weighting = "bell"
    encoders = ("text_encoder", "vae")
    ragged_conditions = frozenset({"text", "text_mask"})
    typical_text_tokens = 512  # for the memory estimate: the longest prompt the pipeline takes

    def __init__(
        self,
        sigma_shift: float | None = None,
        controlnet: str | None = None,
        train_controlnet: bool = False,
        edit_image_area: int | None = None,
    ):
        if edit_image_area is not None and edit_image_area < 256:
            raise ValueError(f"edit_image_area={edit_image_area} must be at least 256 pixels (one 16x16 patch)")
        super().__init__(sigma_shift)
        self.controlnet, self.train_controlnet, self.edit_image_area = controlnet, train_controlnet, edit_image_area
        self.trainable_model = "controlnet" if train_controlnet else "dit"
        self.pipe: Any = None  # the loaded pipeline: predict needs the frozen DiT when the ControlNet trains

    # ------------------------------------------------------------------ loading and checks
    def load_pipeline(self, model: Any, device: torch.device, dtype: torch.dtype, vram: Any = None) -> Any:
        """The pipeline, with the ``controlnet`` file when one is given; the part that does not train is frozen."""
        from ds_pipelines.qwen_image import QwenImagePipeline

        options = dict(device=device, torch_dtype=dtype, vram=vram, progress_bar=False)
        extra = {} if self.controlnet is None else {"controlnet": self.controlnet}
        if isinstance(model, Mapping):
            pipe = QwenImagePipeline.from_pretrained(model_configs={**model, **extra}, **options)
        else:
            pipe = QwenImagePipeline.from_pretrained(model, model_configs=extra or None, **options)
        for name in ("dit", "controlnet"):
            module = pipe._components.get(name)
            if isinstance(module, nn.Module) and name != self.trainable_model:
                module.requires_grad_(False)
        self.pipe = pipe
        return pipe

    def check(self, pipe: Any, height: int, width: int, num_frames: int | None) -> None:
        if num_frames not in (None, 1):
            raise ValueError(f"num_frames={num_frames}: Qwen-Image trains on images; leave num_frames unset")
        for name, value in (("height", height), ("width", width)):
            if value % 16:
                raise ValueError(f"{name}={value} is not a multiple of 16 (8x VAE and 2x2 patches)")
        if self.train_controlnet and pipe._components.get("controlnet") is None:
            raise ValueError(
                "train_controlnet needs a ControlNet to train: give its file as family option controlnet=FILE "
                "(a released blockwise ControlNet, or a new one saved with QwenImageBlockwiseControlNet(...)."
                "zero_init_())"
            )
        # The ControlNet runs inside the DiT's blocks (block_residual), never through DDP's forward, so DDP would
        # not average its gradients and the processes' copies would drift apart silently.
        processes = torch.distributed.get_world_size() if _distributed() else 1
        if self.train_controlnet and processes > 1:
            raise ValueError(
                f"train_controlnet runs in one process; this run has {processes} "
                "(launch it without --num_processes, or train a LoRA of the DiT under the frozen ControlNet)"
            )

    def check_extras(self, pipe: Any, roles: Collection[str]) -> None:
        roles = set(roles)
        unknown = roles - set(ROLES)
        if unknown:
            raise ValueError(f"Qwen-Image does not train on {', '.join(sorted(unknown))} columns")
        has_controlnet = pipe._components.get("controlnet") is not None
        controls = roles & {"control_image", "inpaint_mask"}
        if controls and not has_controlnet:
            raise ValueError(
                f"the dataset has {', '.join(sorted(controls))} columns, which feed a ControlNet; load one with "
                "family option controlnet=FILE (and train_controlnet=True to train it)"
            )
        if has_controlnet and not controls:
            raise ValueError(
                "a ControlNet is loaded but the dataset has no control_image column: give each row its control image"
            )
        if "inpaint_mask" in roles or has_controlnet:
            channels = _control_channels(pipe)
            inpaint = "inpaint_mask" in roles
            if inpaint != (channels == 17):
                raise ValueError(
                    f"the loaded ControlNet takes {channels} latent channels, so the dataset "
                    + (
                        "needs an inpaint_mask column (the Inpaint ControlNet)"
                        if channels == 17
                        else "must not have an inpaint_mask column (only the Inpaint ControlNet takes one)"
                    )
                )
        if "edit_image" in roles and pipe._components.get("processor") is None:
            raise ValueError(
                "the dataset has edit_image columns, which need Qwen2.5-VL's processor: train a Qwen-Image-Edit model "
                "(its processor/ folder), or add model_configs={'processor': folder}"
            )
        if not roles and self.train_controlnet:
            raise ValueError("train_controlnet needs a dataset with a control_image column")

    # ------------------------------------------------------------------ encoding
    def estimated_tokens(self, pipe: Any, height: int, width: int, num_frames: int | None) -> int:
        return height * width // 256 + self.typical_text_tokens

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        return _prompt_conditions(pipe.encode_prompt(list(prompts)))

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        return pipe.encode_image(pixels)

    def encode_sample_prompt(
        self, pipe: Any, prompt: str, extras: Mapping[str, list[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        edits = extras.get("edit_image")
        if not edits:
            return self.encode_prompts(pipe, [prompt])
        vl_images, _ = self._edit_images(pipe, edits)
        return _prompt_conditions(pipe.encode_edit_prompt(prompt, vl_images))

    def prompt_depends_on(self, extras: Mapping[str, list[torch.Tensor]]) -> bool:
        return bool(extras.get("edit_image"))

    def encode_extras(
        self,
        pipe: Any,
        pixels: torch.Tensor,
        latents: torch.Tensor,
        extras: Mapping[str, list[torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        conditions: dict[str, torch.Tensor] = {}
        edits = extras.get("edit_image")
        if edits:
            _, vae_images = self._edit_images(pipe, edits)
            for index, image in enumerate(vae_images):
                conditions[f"reference_latents.{index}"] = pipe.encode_image(image)
        if extras.get("control_image") or extras.get("inpaint_mask"):
            from ds_pipelines import ControlNetInput

            height, width = pixels.shape[-2:]
            masks = extras.get("inpaint_mask")
            picture = extras["control_image"][0] if extras.get("control_image") else pixels[0]
            control = ControlNetInput(
                picture.float().clamp(-1, 1),
                inpaint_mask=masks[0].float() if masks else None,
                control_type="inpaint" if masks else None,
            )
            conditions["control"] = pipe.encode_control(control, height, width)
        return conditions

    def _edit_images(self, pipe: Any, edits: list[torch.Tensor]) -> tuple[list[Image.Image], list[Image.Image]]:
        """(what Qwen2.5-VL sees, what the VAE encodes) for a sample's edit images: the pipeline's own resizing,
        the VAE's at ``edit_image_area`` when set."""
        from ds_pipelines.media import tensor_to_images

        images = [tensor_to_images(edit[None].float())[0] for edit in edits]
        vl_images, vae_images = pipe.prepare_edit_images(images)
        if self.edit_image_area is not None:
            from ds_pipelines.qwen_image import edit_dimensions

            vae_images = [
                image.resize(edit_dimensions(*image.size, self.edit_image_area), Image.Resampling.LANCZOS)
                for image in images
            ]
            if getattr(pipe, "edit_variant", "edit-plus") == "edit":  # the original Edit model shows the VAE's image
                vl_images = vae_images
        return vl_images, vae_images

    # ------------------------------------------------------------------ the model
    def predict(
        self, model: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, conditions: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The pipeline's ``predict`` with the sample's reference latents (in order) and, with a ControlNet, its
        block residuals; ``model`` is the trained one (the DiT, or the ControlNet with the pipeline's DiT frozen)."""
        from ds_pipelines.qwen_image import QwenImagePipeline

        dit = model if self.trainable_model == "dit" else self.pipe.dit
        references = [conditions[key] for key in sorted(_reference_keys(conditions), key=_reference_index)]
        step = {"text": conditions["text"], "text_mask": conditions.get("text_mask"), "reference_latents": references}
        if "control" in conditions:  # packed control tokens at the target's size, as the pipeline encodes them
            controlnet = model if self.trainable_model == "controlnet" else self.pipe.controlnet
            step["block_residual"] = unwrap_model(controlnet).block_residual(
                conditions["control"].to(noisy.dtype), 1.0
            )
        return QwenImagePipeline.predict(dit, noisy, sigmas, step)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        # The frozen DiT's blocks too when the ControlNet trains: its activations carry the gradient to every
        # ControlNet block before them, and they are where the memory goes.
        dit = model if self.trainable_model == "dit" else self.pipe.dit
        return list(unwrap_model(dit).transformer_blocks)

    def sequence_length(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def scheduler(self, pipe: Any) -> Any:
        from ds_pipelines.schedulers import FlowMatchScheduler

        return FlowMatchScheduler("qwen-image")

    def sample_sigmas(
        self, pipe: Any, latents: torch.Tensor, generator: torch.Generator, sampling: str
    ) -> torch.Tensor:
        """Upstream's training sigmas: the draw (``sampling``) shifted by ``e^TRAINING_MU`` (or ``sigma_shift``)
        whatever the resolution, then the "qwen-image" schedule's terminal stretch (``training_sigmas``)."""
        shift = self.sigma_shift if self.sigma_shift is not None else math.exp(TRAINING_MU)
        return self.scheduler(pipe).training_sigmas(
            latents.shape[0], generator=generator, sampling=sampling, shift=shift
        )

    def random_inputs(
        self,
        model: nn.Module,
        batch: int,
        latent_size: tuple[int, int],
        latent_frames: int | None = None,
        text_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        config = unwrap_model(model).config
        tokens = text_tokens or self.typical_text_tokens
        latents = torch.randn(batch, config.out_channels, *latent_size, generator=generator)
        text = torch.randn(batch, tokens, config.joint_attention_dim, generator=generator)
        return latents, {"text": text, "text_mask": torch.ones(batch, tokens, dtype=torch.bool)}

    # ------------------------------------------------------------------ samples
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
        extras: Mapping[str, list[torch.Tensor]] | None = None,
    ) -> Any:
        """A sample at the training size; edit and ControlNet runs use the first dataset item's edit images or
        control image (and mask), so samples show what the run teaches."""
        from ds_pipelines import ControlNetInput
        from ds_pipelines.media import tensor_to_images

        options: dict[str, Any] = dict(seed=seed, height=height, width=width, num_inference_steps=steps)
        extras = extras or {}
        if extras.get("edit_image"):
            options["edit_image"] = [tensor_to_images(edit[None].float())[0] for edit in extras["edit_image"]]
        if extras.get("control_image") or extras.get("inpaint_mask"):
            masks = extras.get("inpaint_mask")
            picture = extras["control_image"][0] if extras.get("control_image") else reference
            options["controlnet_inputs"] = [
                ControlNetInput(
                    picture.float().clamp(-1, 1),
                    inpaint_mask=masks[0].float() if masks else None,
                    control_type="inpaint" if masks else None,
                )
            ]
        return pipe(prompt, **options)


def _prompt_conditions(embedding: Any) -> dict[str, torch.Tensor]:
    """A ``PromptEmbedding`` as conditions with a mask always present (True on the prompt's tokens), so samples of
    different prompt lengths pad into one batch."""
    text = embedding.text
    mask = embedding.mask
    if mask is None:
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    return {"text": text, "text_mask": mask}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _reference_keys(conditions: Mapping[str, torch.Tensor]) -> list[str]:
    return [key for key in conditions if key.startswith("reference_latents.")]


def _reference_index(key: str) -> int:
    return int(key.rsplit(".", 1)[1])


def _control_channels(pipe: Any) -> int:
    """Latent channels the loaded blockwise ControlNet reads (16, or 17 for the Inpaint one with its mask); a
    ValueError for another kind (the InstantX Union runs its own blocks on the prompt: not trained here)."""
    if not pipe.controlnet_is_blockwise:
        raise ValueError(
            f"ds-train trains with Qwen-Image's blockwise ControlNets (Canny, Depth, Inpaint); the loaded ControlNet "
            f"is a {type(unwrap_model(pipe._components['controlnet'])).__name__}"
        )
    return pipe.control_channels()
