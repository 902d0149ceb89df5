"""How many bytes a module's weights take under a storage dtype, from shapes alone (works on the meta device).

The count follows the rules ``enable_vram_management`` applies: the same layers are managed (modules with
their own parameters, and ``units`` as one layer), FP8 applies to Linear, Conv and Embedding weights outside
``never_fp8`` (the model's ``ds_vram_never_fp8`` included) and adds a float32 scale per output channel, every
other tensor keeps the computation dtype. Buffers are counted as they are. Nothing is allocated, so a released
12-billion-parameter configuration built under ``torch.device("meta")`` is sized in milliseconds.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from .config import COMPUTATION_DTYPES, FP8_DTYPES, STORAGE_DTYPES, resolve_dtype
from .layers import FP8_KINDS, layer_kind

__all__ = ["WeightEstimate", "estimate_weights"]


@dataclass(frozen=True)
class WeightEstimate:
    """Bytes of a module's weights on the computation device.

    total_bytes: every managed weight in its storage form plus buffers (what ``storage="device"`` keeps).
    largest_layer_bytes: the biggest managed layer (or unit): a streamed layer is fetched whole, so streaming
        needs at least this much, times the layers in flight.
    parameter_count: elements of all parameters (shared ones once).
    layer_count: managed layers (units count once).
    """

    total_bytes: int
    largest_layer_bytes: int
    parameter_count: int
    layer_count: int


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def estimate_weights(
    module: nn.Module,
    storage_dtype: torch.dtype | str | None = None,
    computation_dtype: torch.dtype | str = torch.bfloat16,
    never_fp8: tuple[str, ...] = (),
    units: tuple[str, ...] = (),
) -> WeightEstimate:
    """Size ``module``'s weights as ds-vram would store them with this ``storage_dtype`` (None: computation)."""
    computation = resolve_dtype(computation_dtype, "computation_dtype", COMPUTATION_DTYPES)
    storage = computation if storage_dtype is None else resolve_dtype(storage_dtype, "storage_dtype", STORAGE_DTYPES)
    never_fp8 = tuple(never_fp8) + tuple(getattr(module, "ds_vram_never_fp8", ()))
    units = tuple(units) + tuple(getattr(module, "ds_vram_units", ()))
    plain = computation if storage in FP8_DTYPES else storage
    seen_parameters: set[int] = set()
    layers: list[int] = []

    def tensor_bytes(parameter: torch.Tensor, fp8: bool) -> int:
        if id(parameter) in seen_parameters:
            return 0
        seen_parameters.add(id(parameter))
        if fp8:
            return parameter.numel() + 4 * parameter.shape[0]
        if not parameter.is_floating_point():
            return parameter.numel() * parameter.element_size()
        return parameter.numel() * plain.itemsize

    def visit(prefix: str, child: nn.Module) -> None:
        unit = bool(prefix) and _matches(prefix, units)
        if unit:
            size = sum(tensor_bytes(p, False) for p in child.parameters())
            if size:
                layers.append(size)
            return
        own = [(name, p) for name, p in child._parameters.items() if p is not None]
        if own:
            fp8 = storage in FP8_DTYPES and layer_kind(child) in FP8_KINDS and not _matches(prefix, never_fp8)
            layers.append(sum(tensor_bytes(p, fp8 and name == "weight") for name, p in own))
        for name, grandchild in child.named_children():
            visit(f"{prefix}.{name}" if prefix else name, grandchild)

    visit("", module)
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    parameters = sum(p.numel() for p in module.parameters())
    return WeightEstimate(sum(layers) + buffers, max(layers, default=0), parameters, len(layers))
