"""Z-Image's training adapter (the family registry names it: ``ds_train.z_image:ZImageTrainingAdapter``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ds_pipelines.base import unwrap_model

from .family import TrainingAdapter

__all__ = ["ZImageTrainingAdapter"]


class ZImageTrainingAdapter(TrainingAdapter):
    """Z-Image (base and Turbo; train base: fine-tuning Turbo erodes its 8-step distillation).

    Default LoRA targets are the attention projections and the SwiGLU of every main layer, as upstream DiffSynth's
    Z-Image LoRA (``to_q,to_k,to_v,to_out.0,w1,w2,w3``). Sigmas are uniform and shifted by 3 (the "z-image"
    schedule's shift, the grid upstream draws training timesteps from) with its bell weighting over sigma. The
    pipeline's ``predict`` turns the DiT's inverted time and negated output into the usual velocity, so the loss
    target is ``noise - x0`` as for every family. Prompts are padded to 512 tokens with their mask, so cached
    prompts stack into batches.
    """

    family = "z-image"
    default_lora_targets = (
        "layers.*.attention.to_q",
        "layers.*.attention.to_k",
        "layers.*.attention.to_v",
        "layers.*.attention.to_out.0",
        "layers.*.feed_forward.w1",
        "layers.*.feed_forward.w2",
        "layers.*.feed_forward.w3",
    )
    default_timestep_sampling = "uniform"
    default_loss_weighting = "bell"
    encoders = ("text_encoder", "vae")
    text_tokens = 512

    def check(self, pipe: Any, height: int, width: int, num_frames: int | None) -> None:
        if num_frames not in (None, 1):
            raise ValueError(f"num_frames={num_frames}: Z-Image trains on images; leave num_frames unset")
        for name, value in (("height", height), ("width", width)):
            if value % 16:
                raise ValueError(f"{name}={value} is not a multiple of 16 (8x VAE and 2x2 patches)")

    def estimated_tokens(self, pipe: Any, height: int, width: int, num_frames: int | None) -> int:
        return height * width // 256 + self.text_tokens

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        embedding = pipe.encode_prompt(list(prompts))
        text, mask = embedding.text, embedding.mask
        padding = self.text_tokens - text.shape[1]
        if padding > 0:  # a fixed length, so prompts encoded one at a time stack (the mask hides the padding)
            text = torch.nn.functional.pad(text, (0, 0, 0, padding))
            mask = torch.nn.functional.pad(mask, (0, padding), value=False)
        return {"text": text, "text_mask": mask}

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        return pipe.encode_image(pixels)

    def sequence_length(self, latents: torch.Tensor) -> int:
        return (latents.shape[-2] // 2) * (latents.shape[-1] // 2)

    def scheduler(self, pipe: Any) -> Any:
        from ds_pipelines.schedulers import FlowMatchScheduler

        return FlowMatchScheduler("z-image")

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(unwrap_model(model).layers)

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
        tokens = text_tokens or self.text_tokens
        latents = torch.randn(batch, config.in_channels, *latent_size, generator=generator)
        text = torch.randn(batch, tokens, config.cap_feat_dim, generator=generator)
        return latents, {"text": text, "text_mask": torch.ones(batch, tokens, dtype=torch.bool)}
