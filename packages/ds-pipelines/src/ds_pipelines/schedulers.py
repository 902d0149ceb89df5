"""One flow-matching scheduler, with a template per family that reproduces its official sampling schedule.

Flow matching moves a sample along ``x_sigma = (1 - sigma) * x_0 + sigma * noise`` from sigma = 1 (noise) to
sigma = 0 (data); the model predicts the velocity ``noise - x_0`` and each Euler step moves by
``(sigma_next - sigma) * velocity``. Families differ only in the grid of sigmas and how it is shifted toward
the noisy end, which every template below states with its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FLOW_MATCH_TEMPLATES", "FlowMatchScheduler", "FlowMatchTemplate", "shift_sigmas"]


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
    keep ``N`` of them before appending the final 0, as their reference code does.
    """

    name: str
    sigma_max: float = 1.0
    shift: float | None = None  # a fixed shift
    mu_points: tuple[tuple[int, float], tuple[int, float]] | None = None  # (sequence length, mu) pairs
    drop_terminal: bool = False

    def shift_for(self, image_sequence_length: int | None) -> float:
        if self.mu_points is not None:
            if image_sequence_length is None:
                raise ValueError(f"the {self.name} schedule depends on the image sequence length; pass it")
            return math.exp(_linear_in_sequence_length(image_sequence_length, *self.mu_points))
        return 1.0 if self.shift is None else self.shift


FLOW_MATCH_TEMPLATES: dict[str, FlowMatchTemplate] = {
    # black-forest-labs/flux sampling.get_schedule: linspace(1, 0, N+1), mu from (256, 0.5) to (4096, 1.15).
    "flux.1": FlowMatchTemplate("flux.1", mu_points=((256, 0.5), (4096, 1.15))),
    # FLUX.1-schnell is sampled without the shift.
    "flux.1-schnell": FlowMatchTemplate("flux.1-schnell"),
    # Wan-Video/Wan2.1 flow solvers: linspace(0.999, 0, N+1)[:-1], shifted (5 by default), then 0 appended.
    "wan": FlowMatchTemplate("wan", sigma_max=0.999, shift=5.0, drop_terminal=True),
}


class FlowMatchScheduler:
    """Euler flow-matching sampler and the training helpers built on the same sigmas.

    ``set_timesteps`` fills ``sigmas`` (N + 1 values, ending at 0) and ``timesteps`` (the N sigmas a model is
    called at, in [0, 1]; a family's model function scales them, FLUX.1 and Wan by 1000).
    """

    def __init__(self, template: str = "flux.1"):
        if template not in FLOW_MATCH_TEMPLATES:
            raise ValueError(f"unknown scheduler template {template!r}; known: {', '.join(FLOW_MATCH_TEMPLATES)}")
        self.template = FLOW_MATCH_TEMPLATES[template]
        self.sigmas = torch.zeros(0)
        self.timesteps = torch.zeros(0)

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        denoising_strength: float = 1.0,
        image_sequence_length: int | None = None,
        sigma_shift: float | None = None,
    ) -> torch.Tensor:
        """Build the schedule; returns ``timesteps``.

        ``denoising_strength`` < 1 (image-to-image) starts the unshifted grid at ``strength * sigma_max`` and
        still runs ``num_inference_steps`` steps over it. ``sigma_shift`` replaces the template's shift.
        """
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
        if not 0 < denoising_strength <= 1:
            raise ValueError(f"denoising_strength={denoising_strength!r} must be in (0, 1]")
        if sigma_shift is not None and sigma_shift <= 0:
            raise ValueError(f"sigma_shift={sigma_shift!r} must be > 0")
        template = self.template
        top = template.sigma_max * denoising_strength
        grid = torch.linspace(top, 0, num_inference_steps + 1, dtype=torch.float64)
        if template.drop_terminal:
            grid = grid[:-1]
        shift = sigma_shift if sigma_shift is not None else template.shift_for(image_sequence_length)
        sigmas = shift_sigmas(grid, shift)
        if template.drop_terminal:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        self.sigmas = sigmas.float()
        self.timesteps = self.sigmas[:-1]
        return self.timesteps

    def step(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """One Euler step from ``sigmas[index]`` to ``sigmas[index + 1]``, computed in float32."""
        delta = (self.sigmas[index + 1] - self.sigmas[index]).item()
        return (sample.float() + delta * velocity.float()).to(sample.dtype)

    @staticmethod
    def add_noise(sample: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The point at ``sigma`` on the straight path from ``sample`` to ``noise``; ``sigma`` may be per batch."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=sample.device)
        if sigma.dim() == 1:
            sigma = sigma.view(-1, *([1] * (sample.dim() - 1)))
        return ((1 - sigma) * sample.float() + sigma * noise.float()).to(sample.dtype)

    @staticmethod
    def velocity_target(sample: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What a flow-matching model learns to predict."""
        return noise - sample

    def training_sigmas(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        image_sequence_length: int | None = None,
        sampling: str = "uniform",
    ) -> torch.Tensor:
        """Sigmas to train at: ``"uniform"`` in (0, 1], or ``"logit_normal"`` (SD3's choice), then shifted."""
        if sampling == "uniform":
            raw = 1 - torch.rand(batch_size, generator=generator)
        elif sampling == "logit_normal":
            raw = torch.sigmoid(torch.randn(batch_size, generator=generator))
        else:
            raise ValueError(f"sampling={sampling!r} is not supported; use 'uniform' or 'logit_normal'")
        return shift_sigmas(raw * self.template.sigma_max, self.template.shift_for(image_sequence_length))

    @staticmethod
    def training_weight(sigmas: torch.Tensor) -> torch.Tensor:
        """A bell over sigma centred at 0.5 with mean 1 over a uniform grid: mid-noise steps teach the most."""
        weight = torch.exp(-2 * (sigmas.float() - 0.5) ** 2)
        grid = torch.exp(-2 * (torch.linspace(0, 1, 1001) - 0.5) ** 2)
        low = grid.min()
        return (weight - low) / (grid - low).mean()
