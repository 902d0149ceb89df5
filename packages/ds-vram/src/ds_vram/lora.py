"""LoRA adapters hot-loaded on managed Linear and Conv layers: added to the output, never fused.

Keeping the adapter apart from the weight is what makes it work on FP8 or disk-stored weights, lets several
adapters stack with their own scales, and makes detaching exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoraAdapter"]


@dataclass
class LoraAdapter:
    """``down`` ``(rank, in_features[, *kernel])`` then ``up`` ``(out_features, rank[, 1, ...])``, times ``scale``.

    For a Conv layer ``down`` is a convolution with the layer's kernel, stride, padding and dilation, and
    ``up`` a 1x1 convolution, so the fused equivalent is ``W + scale * (up.flatten(1) @ down.flatten(1))``.
    Any alpha / rank factor belongs in ``scale``.
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    def delta(self, module: nn.Module, kind: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        down = self.down.to(device=x.device, dtype=dtype)
        up = self.up.to(device=x.device, dtype=dtype)
        if kind == "linear":
            return F.linear(F.linear(x, down), up) * self.scale
        hidden = module._conv_forward(x, down, None)
        spatial = hidden.dim() - 2
        convolution = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
        return convolution(hidden, up.reshape(*up.shape[:2], *([1] * spatial))) * self.scale

    def fused_delta(self, weight_shape: torch.Size) -> torch.Tensor:
        """The change this adapter makes to the layer's weight, for fusing or comparison."""
        product = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (product * self.scale).reshape(weight_shape)


def check_lora_shapes(layer_name: str, module: nn.Module, kind: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """Reject an adapter that cannot apply to ``module``, naming the layer and the shapes at fault."""
    if kind not in ("linear", "conv"):
        raise TypeError(f"LoRA on {layer_name!r}: hot-loading supports Linear and Conv layers, not {kind}")
    weight_shape = tuple(module.weight.shape)
    rank = down.shape[0]
    if kind == "conv" and module.groups != 1:
        raise ValueError(f"LoRA on {layer_name!r}: grouped convolutions (groups={module.groups}) are not supported")
    expected_down = (rank, *weight_shape[1:])
    up_ok = up.dim() >= 2 and tuple(up.shape[:2]) == (weight_shape[0], rank) and all(s == 1 for s in up.shape[2:])
    if tuple(down.shape) != expected_down or not up_ok:
        raise ValueError(
            f"LoRA on {layer_name!r}: weight {weight_shape} needs down {expected_down} and up "
            f"{(weight_shape[0], rank)}, got down {tuple(down.shape)} and up {tuple(up.shape)}"
        )
