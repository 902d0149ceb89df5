"""A rough peak-memory estimate printed before the first step, so a run that cannot fit says so in seconds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MemoryEstimate", "estimate_training_memory"]

GIB = 1024**3


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the training device: frozen weights, trainable weights, gradients, optimizer states, activations."""

    frozen: int
    trainable: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.frozen + self.trainable + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {value / GIB:.2f}"
            for name, value in (
                ("frozen weights", self.frozen),
                ("trainable", self.trainable),
                ("grads", self.gradients),
                ("optimizer", self.optimizer),
                ("activations ~", self.activations),
            )
        )
        return f"estimated peak memory {self.total / GIB:.2f} GiB ({parts} GiB)"


def estimate_training_memory(
    model: nn.Module,
    *,
    resident_frozen_bytes: int | None,
    optimizer: str,
    batch_size: int,
    tokens: int,
    hidden: int,
    blocks: int,
    activation_dtype: torch.dtype,
    checkpointing: bool,
) -> MemoryEstimate:
    """Weights as stored; a gradient per trainable value; AdamW keeps two float32 moments (8-bit: two bytes).

    Activations are a rule of thumb for transformer blocks: about 34 values per token and hidden unit per block
    without checkpointing (attention inputs/outputs, MLP at 4x, norms), or 2 per block plus one block's worth
    with it; ``tokens`` counts image and text tokens. Attention uses a fused kernel (no tokens^2 term).
    """
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = sum(
        p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad and p.device.type != "meta"
    )
    frozen = stored if resident_frozen_bytes is None else resident_frozen_bytes
    per_block = batch_size * tokens * hidden * torch.finfo(activation_dtype).bits // 8
    activations = per_block * (2 * blocks + 34) if checkpointing else per_block * 34 * blocks
    optimizer_bytes = trainable_count * (2 if optimizer == "adamw8bit" else 8)
    return MemoryEstimate(frozen, trainable, trainable_count * 4, optimizer_bytes, activations)
