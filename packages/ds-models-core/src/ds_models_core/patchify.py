"""Latents to token sequences and back, for images (2D patches) and videos (3D patches)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange

__all__ = ["patchify", "unpatchify"]

# Spatial axis names, in order: (frames, height, width) for 3D, (height, width) for 2D.
_AXES = {2: ("h", "w"), 3: ("f", "h", "w")}


def _patterns(n: int, channels_last: bool) -> tuple[str, str]:
    if n not in _AXES:
        raise ValueError(f"patch_size must have 2 (image) or 3 (video) entries, got {n}")
    axes = _AXES[n]
    patch = [f"p{a}" for a in axes]
    grid = " ".join(f"({a} p{a})" for a in axes)
    inner = " ".join([*patch, "c"] if channels_last else ["c", *patch])
    return f"b c {grid}", f"b ({' '.join(axes)}) ({inner})"


def patchify(x: torch.Tensor, patch_size: Sequence[int] = (2, 2), channels_last: bool = False) -> torch.Tensor:
    """Cut a latent into non-overlapping patches and flatten each into a token.

    ``x`` is ``(b, c, h, w)`` with a 2-entry ``patch_size`` or ``(b, c, f, h, w)`` with a 3-entry one (Wan:
    (1, 2, 2)). Tokens come in row-major grid order. Each token is channel-major, ``(c ph pw)``, as in
    FLUX.1's packing and a patch Conv's weight; ``channels_last=True`` gives ``(ph pw c)`` (Z-Image, and
    Wan's output head).

    Returns ``(b, f*h*w / prod(patch_size), c * prod(patch_size))``.
    """
    patch_size = tuple(patch_size)
    src, dst = _patterns(len(patch_size), channels_last)
    if x.ndim != len(patch_size) + 2:
        raise ValueError(
            f"a {len(patch_size)}-entry patch_size needs a {len(patch_size) + 2}-D latent, got {x.ndim}-D"
        )
    bad = [s for s, p in zip(x.shape[2:], patch_size, strict=True) if s % p]
    if bad:
        raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by patch_size {patch_size}")
    names = _AXES[len(patch_size)]
    return rearrange(x, f"{src} -> {dst}", **{f"p{a}": p for a, p in zip(names, patch_size, strict=True)})


def unpatchify(
    tokens: torch.Tensor, size: Sequence[int], patch_size: Sequence[int] = (2, 2), channels_last: bool = False
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(b, n, c * prod(patch_size))`` to ``(b, c, *size)``.

    ``size`` is the latent's spatial size before patchifying, ``(h, w)`` or ``(f, h, w)``.
    """
    patch_size, size = tuple(patch_size), tuple(size)
    src, dst = _patterns(len(patch_size), channels_last)
    if len(size) != len(patch_size) or any(s % p for s, p in zip(size, patch_size, strict=True)):
        raise ValueError(f"size {size} must have one entry per patch axis {patch_size}, each divisible by it")
    names = _AXES[len(patch_size)]
    grid = {a: s // p for a, s, p in zip(names, size, patch_size, strict=True)}
    patches = {f"p{a}": p for a, p in zip(names, patch_size, strict=True)}
    return rearrange(tokens, f"{dst} -> {src}", **grid, **patches)
