"""FP8 weight storage: quantize with a scale, and compute either by casting back or with FP8 matmul.

A plain cast to e4m3fn keeps about two significant digits but only between 2**-9 and 448: typical weights
(|w| ~ 1e-2) fall into its subnormal range and lose most of their bits, and outlier channels saturate.
Scaling each output channel so its largest magnitude maps to the format's maximum avoids both.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["quantize_fp8", "scaled_mm_linear"]


def quantize_fp8(
    weight: torch.Tensor, dtype: torch.dtype, scaling: Literal["channel", "tensor", "none"] = "channel"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantize ``weight`` (output channels first) to an FP8 ``dtype``.

    Returns ``(data, scale)`` with ``weight ≈ data.float() * scale``; ``scale`` is float32 of shape
    ``(out_channels,)`` for ``"channel"``, a 0-d tensor for ``"tensor"``, and ``None`` for ``"none"`` (values
    beyond the format's range saturate).
    """
    maximum = torch.finfo(dtype).max
    source = weight.detach()
    if scaling == "none":
        return source.clamp(-maximum, maximum).to(dtype), None
    magnitude = source.abs().float()
    per_channel = scaling == "channel" and source.dim() >= 2
    amax = magnitude.flatten(1).amax(dim=1) if per_channel else magnitude.amax()
    # An all-zero channel keeps scale 1 rather than dividing by zero.
    scale = torch.where(amax > 0, amax / maximum, torch.ones_like(amax))
    broadcast = scale.view(-1, *([1] * (source.dim() - 1))) if scale.dim() == 1 else scale
    data = (source.float() / broadcast).clamp(-maximum, maximum).to(dtype)
    return data, scale


def dequantize(data: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cast stored FP8 (or any) data back to ``dtype``, applying the per-channel or per-tensor scale."""
    result = data.to(dtype)
    if scale is None:
        return result
    if scale.dim() == 1:
        return result.mul_(scale.to(dtype).view(-1, *([1] * (result.dim() - 1))))
    return result.mul_(scale.to(dtype))


def output_scale_shape(scale: torch.Tensor, output: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Shape a per-channel scale to multiply an output whose channels are on ``channel_dim``."""
    if scale.dim() == 0:
        return scale.to(output.dtype)
    shape = [1] * output.dim()
    shape[channel_dim] = -1
    return scale.to(output.dtype).view(shape)


def scaled_mm_linear(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor | None:
    """``F.linear`` with e4m3fn weights through ``torch._scaled_mm``; ``None`` when the shapes do not allow it.

    Activations are quantized per row (token) on the fly, weights carry their stored per-channel scale, and
    the product accumulates in higher precision before the output is written in ``x.dtype``.
    """
    out_features, in_features = weight.shape
    if in_features % 16 or out_features % 16 or x.numel() == 0:
        return None
    rows = x.reshape(-1, in_features)
    maximum = torch.finfo(torch.float8_e4m3fn).max
    row_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / maximum
    rows_fp8 = (rows.float() / row_scale).clamp(-maximum, maximum).to(torch.float8_e4m3fn)
    if weight_scale is None:
        column_scale = torch.ones(1, out_features, device=x.device, dtype=torch.float32)
    else:
        column_scale = weight_scale.float().expand(out_features).reshape(1, out_features).contiguous()
    padded = (-rows.shape[0]) % 16
    if padded:
        rows_fp8 = torch.nn.functional.pad(rows_fp8.view(torch.uint8), (0, 0, 0, padded)).view(torch.float8_e4m3fn)
        row_scale = torch.nn.functional.pad(row_scale, (0, 0, 0, padded), value=1.0)
    output = torch._scaled_mm(
        rows_fp8,
        weight.t(),
        scale_a=row_scale,
        scale_b=column_scale,
        out_dtype=x.dtype,
    )
    if padded:
        output = output[: rows.shape[0]]
    if bias is not None:  # added here: row-wise scaled matmul does not take a bias on every torch version
        output = output + bias.to(x.dtype)
    return output.reshape(*x.shape[:-1], out_features)
