"""Wan 2.1 / 2.2's training adapter (the family registry names it: ``ds_train.wan:WanTrainingAdapter``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ds_pipelines.base import unwrap_model

from .family import TrainingAdapter

__all__ = ["WanTrainingAdapter"]


class WanTrainingAdapter(TrainingAdapter):
    """Wan 2.1 and 2.2 (the DiT in the official Wan-Video naming), on videos and on images as one-frame clips.

    Default LoRA targets are the attention projections (self and cross: q, k, v, o) and both FFN Linears of every
    block, as DiffSynth-Studio's and musubi-tuner's Wan LoRAs cover. Sigmas are drawn uniformly and shifted by 5
    (the official training grid; ``sigma_shift`` overrides it), and the loss takes DiffSynth-Studio's bell-shaped
    weight over sigma. Image-to-video models (I2V, FLF2V) are conditioned on each clip's first (and last) frame
    exactly as sampling conditions them; ``first_frame_conditioning`` trains Wan2.2-TI2V-5B's image-to-video mode
    (the first latent frame of each clip given clean at timestep 0 and left out of the loss, as sampling pins it;
    images train its text-to-video mode). Wan2.2 A14B has two experts: a run trains one (``expert``), only at the
    noise levels that expert samples (at or above the boundary for ``"high_noise"``, below it for ``"low_noise"``);
    the other stays frozen and is used only for samples.
    """

    family = "wan"
    options: ClassVar[Mapping[str, tuple[Any, str]]] = {
        "expert": (Literal["high_noise", "low_noise"], "Wan2.2 A14B: which expert to train"),
        "boundary": (float, "Wan2.2 A14B: the sigma between the experts (default: the release's)"),
        "first_frame_conditioning": (
            bool,
            "Wan2.2-TI2V-5B: train its image-to-video mode (each clip's first frame given clean)",
        ),
    }
    default_lora_targets = (
        *(f"blocks.*.{attention}.{projection}" for attention in ("self_attn", "cross_attn") for projection in "qkvo"),
        "blocks.*.ffn.0",
        "blocks.*.ffn.2",
    )
    default_timestep_sampling = "uniform"
    default_loss_weighting = "bell"
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
        super().__init__(sigma_shift)
        self.expert, self.boundary = expert, boundary
        self.first_frame_conditioning = first_frame_conditioning
        self.trainable_model = "dit2" if expert == "low_noise" else "dit"
        if expert is not None:  # the other expert is frozen: stored like the encoders, needed only for samples
            self.encoders = (*type(self).encoders, "dit" if expert == "low_noise" else "dit2")

    def check(self, pipe: Any, height: int, width: int, num_frames: int | None) -> None:
        from ds_pipelines.wan_video import check_video_size

        pair = getattr(pipe, "dit2", None) is not None
        if pair and self.expert is None:
            raise ValueError(
                "this Wan2.2 A14B model has two experts; set family_options['expert'] (--expert) to 'high_noise' "
                "or 'low_noise' and train one per run"
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

    def loss_mask(self, conditions: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor | None:
        if "first_frame" not in conditions:
            return None
        mask = torch.ones(1, 1, latents.shape[2], 1, 1, device=latents.device)
        mask[:, :, 0] = 0  # the given frame teaches nothing
        return mask

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(unwrap_model(model).blocks)

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
        shape = (latent_frames or 1, *latent_size)
        latents = torch.randn(batch, config.out_dim, *shape, generator=generator)
        context = torch.randn(batch, text_tokens or config.text_len, config.text_dim, generator=generator)
        conditions = {"context": context}
        if config.in_dim > config.out_dim:  # I2V / FLF2V: mask and frame latents joined on channels
            conditions["condition"] = torch.randn(batch, config.in_dim - config.out_dim, *shape, generator=generator)
        if config.has_image_input:
            tokens = config.clip_tokens * (2 if config.has_image_position_embedding else 1)
            conditions["clip_feature"] = torch.randn(batch, tokens, config.clip_dim, generator=generator)
        return latents, conditions

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
