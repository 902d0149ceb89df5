"""One managed layer: which tensors it owns, how they are stored, and how it computes from fetched copies.

Layers with a known functional form (Linear, Conv, Embedding, LayerNorm, GroupNorm, RMSNorm) compute
straight from the fetched tensors, so FP8 scales can be applied to the (small) output instead of the
(large) weight. Any other module with parameters, and any submodule declared a unit, runs its own forward
with the fetched tensors swapped in for the duration of the call, so ds-vram works on code it never saw.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import dequantize, output_scale_shape, scaled_mm_linear
from .lora import LoraAdapter

__all__ = ["ManagedLayer", "StoredTensor", "layer_kind"]

# Kinds whose weight may be stored in FP8: large matrices whose error a per-channel scale keeps small.
FP8_KINDS = ("linear", "conv", "embedding")


@dataclass
class StoredTensor:
    """A tensor as stored: ``data`` in the storage dtype, and an FP8 ``scale`` (per channel or per tensor)."""

    data: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        scale_bytes = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.data.numel() * self.data.element_size() + scale_bytes

    def to(self, device: torch.device, non_blocking: bool = False) -> StoredTensor:
        if self.data.device == device:
            return self
        scale = None if self.scale is None else self.scale.to(device, non_blocking=non_blocking)
        return StoredTensor(self.data.to(device, non_blocking=non_blocking), scale)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        self.data.record_stream(stream)
        if self.scale is not None:
            self.scale.record_stream(stream)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.data, self.scale, dtype)


@dataclass
class TensorEntry:
    """One parameter of a layer: where it sits in the module tree and which keys name it in a checkpoint."""

    owner: nn.Module
    attribute: str
    relative_name: str  # relative to the layer, e.g. "weight" or "0.weight" inside a unit
    keys: tuple[str, ...]  # full names relative to the managed root; tied parameters have several
    shape: torch.Size
    fp8: bool  # stored in FP8 when the storage dtype is FP8
    requires_grad: bool


@dataclass(eq=False)
class ManagedLayer:
    name: str
    module: nn.Module
    kind: str
    entries: list[TensorEntry]
    original_forward: Callable
    had_instance_forward: bool
    stored: dict[str, StoredTensor] | None = None  # None: read from the weight source (disk storage)
    resident: dict[str, StoredTensor] | None = None  # the copy on the computation device, when onloaded
    keep_resident: bool = False  # chosen to stay on the computation device within the budget
    storage_bytes: int = 0
    storage_dtype: torch.dtype | None = None
    loras: dict[str, LoraAdapter] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"ManagedLayer({self.name!r}, {self.kind}, {self.storage_bytes} bytes)"


def layer_kind(module: nn.Module) -> str:
    """The functional form to compute ``module`` with; "generic" runs the module's own forward."""
    for base, kind in (
        (nn.Linear, "linear"),
        (nn.Conv1d, "conv"),
        (nn.Conv2d, "conv"),
        (nn.Conv3d, "conv"),
        (nn.Embedding, "embedding"),
        (nn.LayerNorm, "layer_norm"),
        (nn.GroupNorm, "group_norm"),
        (nn.RMSNorm, "rms_norm"),
    ):
        # A subclass that overrides forward may do anything: honour it through the generic path.
        if isinstance(module, base) and type(module).forward is base.forward:
            if kind == "embedding" and (module.max_norm is not None or module.sparse):
                return "generic"
            return kind
    return "generic"


def _to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() and x.dtype != dtype else x


def _bias(payload: dict[str, StoredTensor], dtype: torch.dtype) -> torch.Tensor | None:
    bias = payload.get("bias")
    return None if bias is None else bias.dequantized(dtype)


def compute_linear(
    layer: ManagedLayer,
    payload: dict[str, StoredTensor],
    x: torch.Tensor,
    dtype: torch.dtype,
    fp8_matmul: bool,
    refetch: Callable[[], dict[str, StoredTensor]] | None = None,
) -> torch.Tensor:
    """``refetch`` given: the weight is streamed and autograd must not keep it; backward fetches it again."""
    x = _to_dtype(x, dtype)
    if refetch is not None and torch.is_grad_enabled() and x.requires_grad:
        output = _StreamedLinear.apply(x, payload, refetch, dtype, fp8_matmul)
    else:
        output = _linear(x, payload, dtype, fp8_matmul)
    return _add_loras(layer, x, output, dtype)


def _linear(x: torch.Tensor, payload: dict[str, StoredTensor], dtype: torch.dtype, fp8_matmul: bool) -> torch.Tensor:
    weight, bias = payload["weight"], _bias(payload, dtype)
    if fp8_matmul and weight.data.dtype == torch.float8_e4m3fn and x.is_cuda:
        output = scaled_mm_linear(x, weight.data, weight.scale, bias)
        if output is not None:
            return output
    if weight.scale is None:
        return F.linear(x, weight.data.to(dtype), bias)
    # Scale the output rather than the weight: one pass over tokens x channels, not channels x inputs.
    output = F.linear(x, weight.data.to(dtype))
    output = output * output_scale_shape(weight.scale, output, -1)
    return output if bias is None else output + bias


class _StreamedLinear(torch.autograd.Function):
    """A Linear on frozen streamed weights that saves nothing for backward but a way to fetch them again.

    Plain autograd would keep every streamed layer's fetched weight alive until backward, so a training step
    would hold the whole model on the device; here backward costs one more fetch per layer instead.
    """

    @staticmethod
    def forward(ctx, x, payload, refetch, dtype, fp8_matmul):
        ctx.refetch, ctx.dtype = refetch, dtype
        return _linear(x, payload, dtype, fp8_matmul)

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.refetch()["weight"].dequantized(ctx.dtype)
        return grad_output.to(weight.dtype) @ weight, None, None, None, None


def compute_conv(
    layer: ManagedLayer, payload: dict[str, StoredTensor], x: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    x = _to_dtype(x, dtype)
    weight, bias = payload["weight"], _bias(payload, dtype)
    if weight.scale is None:
        output = layer.module._conv_forward(x, weight.data.to(dtype), bias)
    else:
        output = layer.module._conv_forward(x, weight.data.to(dtype), None)
        output = output * output_scale_shape(weight.scale, output, 1)
        if bias is not None:
            output = output + bias.view(1, -1, *([1] * (output.dim() - 2)))
    return _add_loras(layer, x, output, dtype)


def compute_embedding(
    layer: ManagedLayer, payload: dict[str, StoredTensor], indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    module, weight = layer.module, payload["weight"]
    # Gather first, then cast: only the looked-up rows are converted, whatever the vocabulary size.
    rows = F.embedding(indices, weight.data, module.padding_idx).to(dtype)
    if weight.scale is None:
        return rows
    if weight.scale.dim() == 0:
        return rows * weight.scale.to(dtype)
    return rows * F.embedding(indices, weight.scale.to(dtype).unsqueeze(1))


def compute_norm(layer: ManagedLayer, payload: dict[str, StoredTensor], x: torch.Tensor) -> torch.Tensor:
    # Norms compute in the input's dtype: models often run them in float32 on purpose.
    module = layer.module
    weight = payload["weight"].dequantized(x.dtype) if "weight" in payload else None
    bias = payload["bias"].dequantized(x.dtype) if "bias" in payload else None
    if layer.kind == "layer_norm":
        return F.layer_norm(x, module.normalized_shape, weight, bias, module.eps)
    if layer.kind == "group_norm":
        return F.group_norm(x, module.num_groups, weight, bias, module.eps)
    return F.rms_norm(x, module.normalized_shape, weight, module.eps)


@contextmanager
def swapped_parameters(layer: ManagedLayer, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Put plain tensors where the layer's parameters are, for one call of its own forward."""
    previous = []
    try:
        for entry in layer.entries:
            parameters = entry.owner._parameters
            previous.append((parameters, entry.attribute, parameters[entry.attribute]))
            parameters[entry.attribute] = tensors[entry.relative_name]
        yield
    finally:
        for parameters, attribute, value in reversed(previous):
            parameters[attribute] = value


def compute_generic(
    layer: ManagedLayer, payload: dict[str, StoredTensor], dtype: torch.dtype, args: tuple, kwargs: dict
) -> object:
    tensors = {name: stored.dequantized(dtype) for name, stored in payload.items()}
    with swapped_parameters(layer, tensors):
        return layer.original_forward(*args, **kwargs)


def _add_loras(layer: ManagedLayer, x: torch.Tensor, output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    for adapter in layer.loras.values():
        if adapter.scale != 0:
            output = output + adapter.delta(layer.module, layer.kind, x, dtype)
    return output
