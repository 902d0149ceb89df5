"""Sinusoidal timestep embeddings (the input of every family's time MLP)."""

from __future__ import annotations

import math

import torch

__all__ = ["timestep_embedding"]


def timestep_embedding(
    timesteps: torch.Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    downscale_freq_shift: float = 0.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Embed timesteps as ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period ** (-i / (dim/2 - shift))``.

    The defaults are what all our families use (cos first, no shift: FLUX.1/2, Qwen-Image, Wan, Z-Image,
    LTX-2); note that diffusers' ``get_timestep_embedding`` defaults to sin first with shift 1.

    Args:
        timesteps: ``(n,)`` or any shape; may be fractional (the scheduler's 0..1000 scale, or sigma with
            ``scale=1000`` as Qwen-Image does).
        dim: channels of the embedding; an odd ``dim`` gets one trailing zero.
        flip_sin_to_cos: True for ``[cos, sin]``, False for ``[sin, cos]``.
        downscale_freq_shift: ``shift`` above; 1 gives the DDPM/diffusers-default frequencies.
        scale: multiplies the arguments ``t * f_i``.
        max_period: the slowest period.
        dtype: computation and output dtype; Wan computes in ``torch.float64``.

    Returns:
        ``(*timesteps.shape, dim)`` in ``dtype``.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=dtype, device=timesteps.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = timesteps.to(dtype)[..., None] * freqs
    args = scale * args
    first, second = (args.cos(), args.sin()) if flip_sin_to_cos else (args.sin(), args.cos())
    emb = torch.cat([first, second], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
