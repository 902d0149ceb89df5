"""Small training parts the loop composes: dtype choice, checkpointed blocks, optimizer, LR schedule, batch plan."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import torch
from torch import nn

from .data import ImageDataset

__all__ = ["BatchPlan", "enable_gradient_checkpointing", "make_lr_scheduler", "make_optimizer", "parse_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str | None, mixed_precision: str) -> torch.dtype:
    """Frozen-weight dtype: as named, else bfloat16/float16 with mixed precision and float32 without."""
    if name is None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    if name not in _DTYPES:
        raise ValueError(f"weight_dtype={name!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def enable_gradient_checkpointing(blocks: list[nn.Module], offload_to_cpu: bool = False) -> None:
    """Recompute each block in backward instead of keeping its activations (``use_reentrant=False``).

    ``offload_to_cpu`` also moves the few tensors kept per block (its inputs) to CPU memory during the forward
    pass (``torch.autograd.graph.save_on_cpu``), trading PCIe traffic for device memory. Without gradients
    (sampling) blocks run plainly.
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_ds_train_checkpointed", False):
            continue
        original = block.forward

        @functools.wraps(original)
        def forward(*args, _original=original, **kwargs):
            if not torch.is_grad_enabled():
                return _original(*args, **kwargs)
            if offload_to_cpu:
                pin = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
                with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                    return checkpoint(_original, *args, use_reentrant=False, **kwargs)
            return checkpoint(_original, *args, use_reentrant=False, **kwargs)

        block.forward = forward
        block._ds_train_checkpointed = True


def make_optimizer(
    parameters: list[nn.Parameter], name: str, learning_rate: float, weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (``"adamw8bit"``; needs bitsandbytes and a CUDA device)."""
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError as error:
            raise ImportError("optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes") from error
        return bitsandbytes.optim.AdamW8bit(parameters, lr=learning_rate, weight_decay=weight_decay)
    raise ValueError(f"optimizer={name!r}; use 'adamw' or 'adamw8bit'")


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then constant, linear decay to 0, or cosine decay to 0 (one scheduler step per step)."""
    if name not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr_scheduler={name!r}; use constant, linear or cosine")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class BatchPlan:
    """The data order as a pure function of (seed, micro-step): epoch ``e`` is a permutation seeded by ``seed + e``.

    With ``num_processes`` > 1, micro-batch ``k`` of process ``p`` is the epoch stream's batch ``k * n + p``; so a
    resumed run (``start`` micro-steps in) sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int, rank: int = 0, num_processes: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.num_processes = rank, num_processes
        self.start = 0

    def __iter__(self) -> Iterator[list[int]]:
        position, epoch = 0, 0
        wanted = self.start * self.num_processes + self.rank
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            for batch in self.dataset.batches(self.batch_size, generator):
                if position >= wanted and (position - self.rank) % self.num_processes == 0:
                    yield batch
                position += 1
            epoch += 1
