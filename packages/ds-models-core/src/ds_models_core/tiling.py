"""Spatial tiling for VAEs: run a function on overlapping tiles of an image or video and blend the outputs.

Tiles lie on the LATENT grid whatever the direction: ``tile_size`` and ``tile_stride`` count latents, and one
latent is ``in_scale`` samples of the input and ``out_scale`` of the output (encode: ``in_scale`` = the VAE's
spatial compression, ``out_scale`` = 1; decode: the reverse). The spatial axes are the last two, so images
``(B, C, H, W)`` and videos ``(B, C, T, H, W)`` tile alike. Each tile's output is weighted by linear ramps over
the overlaps with its neighbours (never 0, facing ramps sum to one) and the blend is divided by the summed weights,
so a function that acts pixel by pixel gives exactly its untiled result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["blend_ramp", "check_tiles", "run_tiled", "tile_spans"]


def tile_spans(size: int, tile: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(start, length, lead, trail)`` of tiles of ``tile`` latents every ``stride`` along an axis of ``size``.

    The last tile is moved back to end flush with the axis (one tile of ``size`` if ``size <= tile``); ``lead``
    and ``trail`` are the overlaps with the previous and next tile, over which the blending weights ramp.
    """
    if size <= tile:
        return [(0, size, 0, 0)]
    starts = [*range(0, size - tile, stride), size - tile]
    spans = []
    for i, start in enumerate(starts):
        lead = starts[i - 1] + tile - start if i > 0 else 0
        trail = start + tile - starts[i + 1] if i < len(starts) - 1 else 0
        spans.append((start, tile, lead, trail))
    return spans


def blend_ramp(length: int, lead: int, trail: int) -> torch.Tensor:
    """Blend weights of one tile along one axis: linear ramps (never 0) over the ``lead`` and ``trail`` samples."""
    w = torch.ones(length)
    if lead:
        w[:lead] = (torch.arange(lead) + 0.5) / lead
    if trail:
        w[length - trail :] = torch.minimum(w[length - trail :], (torch.arange(trail, 0, -1) - 0.5) / trail)
    return w


def check_tiles(
    tile_size: int | tuple[int, int], tile_stride: int | tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(height, width)`` pairs of a tile size and stride given as pairs or as one int for both axes.

    Raises ValueError unless both are positive latent counts with stride <= size (stride == size: no overlap).
    """
    size, stride = (_pair(value) for value in (tile_size, tile_stride))
    ok = size is not None and stride is not None
    if not ok or any(st > t for st, t in zip(stride, size, strict=True)):
        raise ValueError(
            f"tile_size={tile_size!r} and tile_stride={tile_stride!r} must be (height, width) pairs of positive "
            "latent counts with stride <= size (e.g. tile_size=(30, 52), tile_stride=(15, 26))"
        )
    return size, stride  # type: ignore[return-value]


def _pair(value: object) -> tuple[int, int] | None:
    """``(value, value)`` for an int, the pair itself for two ints, None for anything else."""
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, tuple | list) else ()
    if len(pair) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        return pair  # type: ignore[return-value]
    return None


def run_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tile_size: int | tuple[int, int],
    tile_stride: int | tuple[int, int],
    in_scale: int = 1,
    out_scale: int = 1,
) -> torch.Tensor:
    """Run ``fn`` on overlapping spatial tiles of ``x`` (``(..., H, W)``) and blend the outputs.

    ``tile_size`` and ``tile_stride`` are in latents (an int for both axes or a ``(height, width)`` pair; the
    overlap is ``tile_size - tile_stride``). ``fn`` must map ``(..., h * in_scale, w * in_scale)`` to
    ``(..., h * out_scale, w * out_scale)`` with the same leading sizes for every tile. The blend is computed in
    float32 (float64 for float64 outputs) and returned in ``x``'s dtype; one tile covering everything returns
    ``fn(x)`` exactly.
    """
    (tile_h, tile_w), (stride_h, stride_w) = check_tiles(tile_size, tile_stride)
    height, width = x.shape[-2:]
    if height % in_scale or width % in_scale:
        raise ValueError(f"tiling needs height and width divisible by {in_scale}, got {height}x{width}")
    grid_h, grid_w = height // in_scale, width // in_scale
    s = out_scale
    out = weight = None
    for top, th, lead_h, trail_h in tile_spans(grid_h, tile_h, stride_h):
        for left, tw, lead_w, trail_w in tile_spans(grid_w, tile_w, stride_w):
            rows = slice(top * in_scale, (top + th) * in_scale)
            cols = slice(left * in_scale, (left + tw) * in_scale)
            piece = fn(x[..., rows, cols])
            if out is None:
                dtype = torch.promote_types(piece.dtype, torch.float32)  # half precision blends in float32
                out = piece.new_zeros(*piece.shape[:-2], grid_h * s, grid_w * s, dtype=dtype)
                weight = piece.new_zeros(grid_h * s, grid_w * s, dtype=dtype)
            mask = blend_ramp(th * s, lead_h * s, trail_h * s)[:, None] * blend_ramp(tw * s, lead_w * s, trail_w * s)
            mask = mask.to(piece.device, dtype)
            rows, cols = slice(top * s, (top + th) * s), slice(left * s, (left + tw) * s)
            out[..., rows, cols] += piece.to(dtype) * mask
            weight[rows, cols] += mask
            del piece  # one tile's output at a time: the point of tiling is bounded memory
    return (out / weight).to(x.dtype)
