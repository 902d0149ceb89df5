"""RMS normalisation, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` over the last dimension.

    As in the FLUX.1, Wan and Z-Image references, the statistics and the division run in float32 (or
    wider, for float64 input) and the result is cast back to ``x.dtype`` before the weight is applied,
    so half-precision activations do not lose the small mean of squares. The output has ``x.dtype``.

    Args:
        x: ``(..., dim)``.
        weight: ``(dim,)`` or None (parameter-free, as LTX-2 uses it).
        eps: added to the mean square.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    out = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    if weight is not None:
        out = out * weight.to(x.dtype)
    return out


class RMSNorm(nn.Module):
    """RMS norm over the last dimension with an optional learned scale ``weight`` of shape ``(dim,)``.

    The parameter is named ``weight`` (diffusers, Wan, Z-Image checkpoints) unless ``parameter_name`` says
    otherwise (FLUX.1's files say ``scale``), so official checkpoints load without renaming.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        parameter_name: str = "weight",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.parameter_name = parameter_name
        weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype)) if elementwise_affine else None
        self.register_parameter(parameter_name, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, getattr(self, self.parameter_name), self.eps)

    def extra_repr(self) -> str:
        affine = getattr(self, self.parameter_name) is not None
        return f"{self.dim}, eps={self.eps}, elementwise_affine={affine}, parameter_name={self.parameter_name!r}"
