"""Rotary position embeddings in the three layouts the model families use.

All three rotate pairs of channels by ``angle = position * theta ** (-2i / axis_dim)``; they differ in
which channels form a pair and how the rotation is stored:

* real 2x2 matrices on adjacent pairs (FLUX.1, and FLUX.2's interleaved cos/sin is the same math):
  :func:`rope` + :func:`apply_rope`;
* complex numbers on adjacent pairs (Wan, Qwen-Image, Z-Image): :func:`rope_complex` +
  :func:`apply_rope_complex`;
* split halves, channel ``i`` paired with ``i + dim/2`` (LTX-2, transformers): :func:`rope_split` +
  :func:`apply_rope_split` (with :func:`rotate_half`).

Positions have N axes (time, height, width, ...). Each axis gets its own slice of the head dimension
(``axes_dim``, e.g. FLUX.1's (16, 56, 56)) and optionally its own theta; the slices are concatenated
in axis order. Angles are computed in float64, as the references do, before they are rounded.

Shapes: ``positions`` is ``(..., n_axes)`` (or ``(...)`` when ``axes_dim`` is a single int). The
embeddings have the same leading shape, typically ``(seq,)`` or ``(batch, seq)``, and no heads axis;
the ``apply_*`` functions take ``x`` as ``(..., seq, heads, head_dim)`` (the attention layout) and
broadcast the embeddings over heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "apply_rope",
    "apply_rope_complex",
    "apply_rope_split",
    "grid_positions",
    "rope",
    "rope_angles",
    "rope_complex",
    "rope_split",
    "rotate_half",
]


def rope_angles(
    positions: torch.Tensor, axes_dim: int | Sequence[int], theta: float | Sequence[float] = 10000.0
) -> torch.Tensor:
    """Rotation angles ``(..., sum(axes_dim) // 2)`` in float64, axis by axis.

    Args:
        positions: ``(..., n_axes)`` positions (may be fractional or negative); ``(...)`` if ``axes_dim``
            is an int.
        axes_dim: channels per axis, each even; their sum is the rotated head dimension.
        theta: base period, one for all axes or one per axis.
    """
    if isinstance(axes_dim, int):
        axes_dim, positions = (axes_dim,), positions[..., None]
    axes_dim = tuple(axes_dim)
    thetas = (float(theta),) * len(axes_dim) if isinstance(theta, int | float) else tuple(theta)
    if positions.shape[-1] != len(axes_dim) or len(thetas) != len(axes_dim):
        raise ValueError(
            f"positions have {positions.shape[-1]} axes, axes_dim has {len(axes_dim)} entries and theta "
            f"{len(thetas)}; they must agree"
        )
    if any(d <= 0 or d % 2 for d in axes_dim):
        raise ValueError(f"every entry of axes_dim must be a positive even number, got {axes_dim}")
    pos = positions.to(torch.float64)
    angles = []
    for i, (dim, base) in enumerate(zip(axes_dim, thetas, strict=True)):
        exponent = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
        angles.append(pos[..., i, None] * (1.0 / base**exponent))
    return torch.cat(angles, dim=-1)


def rope(
    positions: torch.Tensor,
    axes_dim: int | Sequence[int],
    theta: float | Sequence[float] = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rotation matrices ``[[cos, -sin], [sin, cos]]`` of shape ``(..., head_dim // 2, 2, 2)`` (FLUX.1)."""
    angles = rope_angles(positions, axes_dim, theta)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).to(dtype)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(x[2i], x[2i+1])`` of ``x`` by the matrices from :func:`rope`.

    ``x``: ``(..., seq, heads, head_dim)``; ``freqs``: ``(..., seq, head_dim // 2, 2, 2)``. Computed in
    the wider of the two dtypes and returned in ``x.dtype``.
    """
    compute = torch.promote_types(x.dtype, freqs.dtype)
    pairs = x.to(compute).unflatten(-1, (-1, 1, 2))  # (..., head_dim/2, 1, 2): a row vector per pair
    f = freqs.to(compute).unsqueeze(-4)  # broadcast over heads
    out = f[..., 0] * pairs[..., 0] + f[..., 1] * pairs[..., 1]  # matrix @ pair, by columns
    return out.flatten(-2).to(x.dtype)


def rope_complex(
    positions: torch.Tensor,
    axes_dim: int | Sequence[int],
    theta: float | Sequence[float] = 10000.0,
    dtype: torch.dtype = torch.complex64,
) -> torch.Tensor:
    """Unit complex numbers ``exp(i * angle)`` of shape ``(..., head_dim // 2)`` (Wan, Qwen-Image, Z-Image).

    Wan rotates in double precision: pass ``dtype=torch.complex128``.
    """
    angles = rope_angles(positions, axes_dim, theta)
    return torch.polar(torch.ones_like(angles), angles).to(dtype)


def apply_rope_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of ``x``, read as complex numbers, by ``freqs`` from :func:`rope_complex`.

    ``x``: ``(..., seq, heads, head_dim)``; ``freqs``: ``(..., seq, head_dim // 2)`` complex. Computed in
    the precision of ``freqs`` (or of ``x`` if wider) and returned in ``x.dtype``.
    """
    real = torch.promote_types(x.dtype, freqs.real.dtype)
    pairs = torch.view_as_complex(x.to(real).unflatten(-1, (-1, 2)).contiguous())
    rotated = pairs * freqs.to(pairs.dtype).unsqueeze(-2)  # broadcast over heads
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def rope_split(
    positions: torch.Tensor,
    axes_dim: int | Sequence[int],
    theta: float | Sequence[float] = 10000.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(..., head_dim)``: the angles of all axes, then the same angles again.

    This is the split-halves layout: channel ``i`` pairs with channel ``i + head_dim // 2``.
    """
    angles = rope_angles(positions, axes_dim, theta)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``cos``/``sin`` from :func:`rope_split`.

    ``x``: ``(..., seq, heads, head_dim)``; ``cos``, ``sin``: ``(..., seq, head_dim)``. Computed in the
    wider dtype and returned in ``x.dtype``.
    """
    compute = torch.promote_types(x.dtype, cos.dtype)
    xc = x.to(compute)
    out = xc * cos.to(compute).unsqueeze(-2) + rotate_half(xc) * sin.to(compute).unsqueeze(-2)
    return out.to(x.dtype)


def grid_positions(
    sizes: Sequence[int],
    start: Sequence[float] | None = None,
    centered: bool | Sequence[bool] = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Positions of a token grid, flattened in row-major order: ``(prod(sizes), len(sizes))`` float32.

    Axis ``a`` runs ``start[a] + 0 .. sizes[a] - 1``, or, when centered (Qwen-Image height and width),
    ``start[a] - (n - n // 2) .. start[a] + n // 2 - 1``. FLUX.1 image ids are ``grid_positions((1, h, w))``
    (Kontext references: ``start=(1, 0, 0)``); Wan's are ``grid_positions((f, h, w))``.
    """
    n = len(sizes)
    start = (0.0,) * n if start is None else tuple(start)
    centered = (centered,) * n if isinstance(centered, bool) else tuple(centered)
    if len(start) != n or len(centered) != n:
        raise ValueError(
            f"sizes, start and centered must have one entry per axis; got {n}, {len(start)}, {len(centered)}"
        )
    axes = []
    for size, offset, center in zip(sizes, start, centered, strict=True):
        first = offset - (size - size // 2) if center else offset
        axes.append(torch.arange(size, dtype=torch.float32, device=device) + first)
    grid = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(grid, dim=-1).reshape(-1, n)
