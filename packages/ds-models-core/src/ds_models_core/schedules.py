"""Flow-matching sampling schedules as pure math: a family's template and the sigma grid it gives.

Flow matching moves a sample along ``x_sigma = (1 - sigma) * x_0 + sigma * noise`` from sigma = 1 (noise) to
sigma = 0 (data). Families differ only in the grid of sigmas and how it is shifted toward the noisy end; each family
package states its templates, with their sources, in its own ``schedules.py`` (``SCHEDULES``). The sampler that
walks the grid lives in ``ds_pipelines.schedulers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FlowMatchTemplate", "flow_match_sigmas", "shift_sigmas", "stretch_to_terminal"]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * s / (1 + (shift - 1) * s)``: spends more steps at high noise for shift > 1.

    It equals FLUX.1's exponential ``time_shift(mu, 1, s)`` with ``shift = exp(mu)``, so one formula covers the
    static (Wan, Z-Image) and the resolution-dependent (FLUX.1) shifts.
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _linear_in_sequence_length(length: int, start: tuple[int, float], end: tuple[int, float]) -> float:
    (x1, y1), (x2, y2) = start, end
    return y1 + (y2 - y1) * (length - x1) / (x2 - x1)


@dataclass(frozen=True)
class FlowMatchTemplate:
    """A family's schedule: the unshifted grid's top, and either a fixed shift or a mu linear in sequence length.

    The grid is ``linspace(sigma_max, 0, N + 1)``; ``drop_terminal`` families (Wan) build ``N + 1`` points and
    keep ``N`` of them before appending the final 0, as their reference code does. ``shift_terminal`` (Qwen-Image
    0.02, LTX-2 0.1) stretches the shifted sigmas so the last one before 0 lands on that value: a distance from 0
    the model was trained to take in one step, which a shift toward the noisy end would otherwise make smaller.
    """

    name: str
    sigma_max: float = 1.0
    shift: float | None = None  # a fixed shift
    mu_points: tuple[tuple[int, float], tuple[int, float]] | None = None  # (sequence length, mu) pairs
    drop_terminal: bool = False
    shift_terminal: float | None = None  # the last nonzero sigma after the stretch

    def __post_init__(self) -> None:
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"FlowMatchTemplate.shift_terminal={self.shift_terminal!r} must be in (0, 1)")

    def shift_for(self, image_sequence_length: int | None) -> float:
        """The shift at this image sequence length (tokens of the DiT's image stream); 1 means no shift."""
        if self.mu_points is not None:
            if image_sequence_length is None:
                raise ValueError(f"the {self.name} schedule depends on the image sequence length; pass it")
            return math.exp(_linear_in_sequence_length(image_sequence_length, *self.mu_points))
        return 1.0 if self.shift is None else self.shift


def flow_match_sigmas(
    template: FlowMatchTemplate,
    num_inference_steps: int,
    denoising_strength: float = 1.0,
    image_sequence_length: int | None = None,
    sigma_shift: float | None = None,
) -> torch.Tensor:
    """The sampling sigmas of a template: ``num_inference_steps + 1`` float64 values from the top down to 0.

    ``denoising_strength`` < 1 (image-to-image) starts the unshifted grid at ``strength * sigma_max`` and still
    runs ``num_inference_steps`` steps over it. ``sigma_shift`` replaces the template's shift.
    ``image_sequence_length`` is needed by templates whose shift depends on it (FLUX.1).
    """
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
    if not 0 < denoising_strength <= 1:
        raise ValueError(f"denoising_strength={denoising_strength!r} must be in (0, 1]")
    if sigma_shift is not None and sigma_shift <= 0:
        raise ValueError(f"sigma_shift={sigma_shift!r} must be > 0")
    top = template.sigma_max * denoising_strength
    grid = torch.linspace(top, 0, num_inference_steps + 1, dtype=torch.float64)
    if template.drop_terminal:
        grid = grid[:-1]
    shift = sigma_shift if sigma_shift is not None else template.shift_for(image_sequence_length)
    sigmas = shift_sigmas(grid, shift)
    if template.drop_terminal:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    if template.shift_terminal is not None:
        sigmas = torch.cat([stretch_to_terminal(sigmas[:-1], template.shift_terminal), sigmas[-1:]])
    return sigmas


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Scale ``1 - sigma`` so the last sigma becomes ``terminal``, keeping the first (diffusers' ``shift_terminal``).

    A one-point grid at sigma 1 has nothing to stretch (diffusers divides by zero there); it is returned as is.
    """
    gap = 1 - sigmas
    if gap[-1] == 0:
        return sigmas
    return 1 - gap * ((1 - terminal) / gap[-1])
