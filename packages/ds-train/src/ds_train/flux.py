"""FLUX.1's training adapter (the family registry names it: ``ds_train.flux:FluxTrainingAdapter``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ds_pipelines.base import unwrap_model

from .family import TrainingAdapter

__all__ = ["FluxTrainingAdapter"]


class FluxTrainingAdapter(TrainingAdapter):
    """FLUX.1 (dev, schnell, Krea; the DiT in BFL naming).

    Default LoRA targets are every Linear inside the double and single blocks (attention q/k/v and output,
    MLPs and the modulation projections), as kohya and ComfyUI FLUX LoRAs cover; sigmas are logit-normal and
    shifted by FLUX.1's resolution-dependent mu (dev) as its sampling schedule is, with a plain MSE.
    """

    family = "flux.1"
    options: ClassVar[Mapping[str, tuple[Any, str]]] = {
        "guidance": (float, "FLUX.1-dev's embedded guidance during training (default 1.0)"),
        "t5_sequence_length": (int, "T5 prompt tokens (default: the model's, 512 for dev, 256 for schnell)"),
    }
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
        super().__init__(sigma_shift)
        self.guidance = guidance
        self.t5_sequence_length = t5_sequence_length

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
        # Guidance-distilled models (dev) train at one embedded guidance; the step ignores it for the others.
        guidance = torch.full((noisy.shape[0],), self.guidance, device=noisy.device, dtype=noisy.dtype)
        return super().predict(model, noisy, sigmas, conditions | {"guidance": guidance})

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        model = unwrap_model(model)
        return [*model.double_blocks, *model.single_blocks]

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
        tokens = text_tokens or self.t5_sequence_length or 512
        latents = torch.randn(batch, config.out_channels // 4, *latent_size, generator=generator)  # 2x2 patches
        text = torch.randn(batch, tokens, config.context_in_dim, generator=generator)
        return latents, {"text": text, "pooled": torch.randn(batch, config.vec_in_dim, generator=generator)}
