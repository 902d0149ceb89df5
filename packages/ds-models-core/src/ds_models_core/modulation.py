"""adaLN helpers: the shift/scale/gate arithmetic every DiT block repeats."""

from __future__ import annotations

import torch

__all__ = ["gated_residual", "modulate", "split_modulation"]


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` (shift None: scale only, as Z-Image does).

    ``shift`` and ``scale`` must broadcast against ``x``: for tokens ``(batch, seq, dim)`` and one vector
    per sample ``(batch, dim)``, pass ``scale[:, None]``; per-token modulation (Wan 2.2 TI2V, LTX-2) is
    ``(batch, seq, dim)`` as is.
    """
    out = x * (1 + scale)
    return out if shift is None else out + shift


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate * y``: a block's residual update scaled by its adaLN gate."""
    return x + gate * y


def split_modulation(params: torch.Tensor, n: int, dim: int = -1) -> tuple[torch.Tensor, ...]:
    """Split the output of a modulation Linear into ``n`` equal chunks along ``dim``.

    The order of the chunks is the checkpoint's: FLUX.1 gives (shift, scale, gate) per half, the
    diffusers-derived final norms give (scale, shift); the caller names them.
    """
    if params.shape[dim] % n:
        raise ValueError(f"cannot split {params.shape[dim]} modulation channels into {n} equal parts")
    return tuple(params.chunk(n, dim=dim))
