"""Per-family training adapters: the few things a training loop must know about a model family.

An adapter loads the family's pipeline, encodes prompts and images with the pipeline's own steps (so training
sees exactly what sampling sees), runs the trainable model on noisy latents, names the default LoRA targets and
the blocks to checkpoint, and chooses how sigmas are sampled and losses weighted. Everything else (data,
optimisation, checkpoints) is family-independent. A new family (Wan) registers one more adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["ADAPTERS", "FluxTrainingAdapter", "TrainingAdapter", "get_adapter"]


class TrainingAdapter:
    """The family hook. Conditions and latents are dicts/tensors with the batch on dim 0, so they can be cached."""

    name: ClassVar[str] = ""
    trainable_model: ClassVar[str] = "dit"  # the component LoRA attaches to
    default_lora_targets: ClassVar[tuple[str, ...]] = ()
    default_timestep_sampling: ClassVar[str] = "uniform"
    default_loss_weighting: ClassVar[str] = "none"
    encoders: ClassVar[tuple[str, ...]] = ()  # components only needed to encode (freed when caching)

    def load_pipeline(self, model: Any, device: torch.device, dtype: torch.dtype, vram: Any = None) -> Any:
        raise NotImplementedError

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sequence_length(self, latents: torch.Tensor) -> int:
        raise NotImplementedError

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, conditions: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks gradient checkpointing wraps."""
        raise NotImplementedError

    def sample(self, pipe: Any, prompt: str, seed: int, height: int, width: int, steps: int) -> Any:
        raise NotImplementedError

    def scheduler(self, pipe: Any) -> Any:
        raise NotImplementedError

    def sample_sigmas(
        self, pipe: Any, latents: torch.Tensor, generator: torch.Generator, sampling: str
    ) -> torch.Tensor:
        return self.scheduler(pipe).training_sigmas(
            latents.shape[0],
            generator=generator,
            image_sequence_length=self.sequence_length(latents),
            sampling=sampling,
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

    def __init__(self, guidance: float = 1.0, t5_sequence_length: int | None = None):
        self.guidance = guidance
        self.t5_sequence_length = t5_sequence_length

    def load_pipeline(self, model: Any, device: torch.device, dtype: torch.dtype, vram: Any = None) -> Any:
        from ds_pipelines import FluxImagePipeline

        if isinstance(model, dict):
            return FluxImagePipeline.from_pretrained(
                model_configs=model, device=device, torch_dtype=dtype, vram=vram, progress_bar=False
            )
        return FluxImagePipeline.from_pretrained(
            model, device=device, torch_dtype=dtype, vram=vram, progress_bar=False
        )

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

    def sample(self, pipe: Any, prompt: str, seed: int, height: int, width: int, steps: int) -> Any:
        return pipe(prompt, seed=seed, height=height, width=width, num_inference_steps=steps)


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


ADAPTERS: dict[str, Callable[..., TrainingAdapter]] = {"flux.1": FluxTrainingAdapter}


def get_adapter(family: str = "flux.1", **options: Any) -> TrainingAdapter:
    if family not in ADAPTERS:
        raise ValueError(f"no training adapter for family {family!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[family](**options)
