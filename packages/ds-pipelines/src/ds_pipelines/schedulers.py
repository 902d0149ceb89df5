"""One flow-matching scheduler; each family's templates reproduce its official sampling schedule.

Flow matching moves a sample along ``x_sigma = (1 - sigma) * x_0 + sigma * noise`` from sigma = 1 (noise) to
sigma = 0 (data); the model predicts the velocity ``noise - x_0`` and each Euler step moves by
``(sigma_next - sigma) * velocity``. Families differ only in the grid of sigmas and how it is shifted toward
the noisy end: the grid math is ``ds_models_core.schedules``, and each family states its templates, with their
sources, in its own ``schedules.py`` (registered through its family descriptor). Nothing here names a family.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

from ds_loader.families import list_families, schedule_template
from ds_models_core.schedules import FlowMatchTemplate, flow_match_sigmas, shift_sigmas

__all__ = ["FLOW_MATCH_TEMPLATES", "FlowMatchScheduler", "FlowMatchTemplate", "FlowUniPCScheduler", "shift_sigmas"]

TRAINING_GRID = 1000  # timesteps of the grid reference trainers draw from (its smallest is the terminal value)


class _InstalledTemplates(Mapping[str, FlowMatchTemplate]):
    """Every installed family's schedule templates by name, read from the family registry at each use."""

    def _templates(self) -> dict[str, FlowMatchTemplate]:
        return {name: template for family in list_families() for name, template in family.schedules.items()}

    def __getitem__(self, name: str) -> FlowMatchTemplate:
        return self._templates()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._templates())

    def __len__(self) -> int:
        return len(self._templates())


FLOW_MATCH_TEMPLATES: Mapping[str, FlowMatchTemplate] = _InstalledTemplates()


class FlowMatchScheduler:
    """Euler flow-matching sampler and the training helpers built on the same sigmas.

    ``template``: a ``FlowMatchTemplate``, or the name of one an installed family declares in its ``SCHEDULES``
    (an unknown name is a ValueError listing the known ones).

    ``set_timesteps`` fills ``sigmas`` (N + 1 values, ending at 0) and ``timesteps`` (the N sigmas a model is
    called at, in [0, 1]; a family's model function scales them, typically by 1000).
    """

    def __init__(self, template: FlowMatchTemplate | str):
        if isinstance(template, str):
            template = schedule_template(template)
        elif not isinstance(template, FlowMatchTemplate):
            raise TypeError(f"template must be a FlowMatchTemplate or its name, got {type(template).__name__}")
        self.template = template
        self.sigmas = torch.zeros(0)
        self.timesteps = torch.zeros(0)
        self._sigmas64 = torch.zeros(0, dtype=torch.float64)

    def set_timesteps(
        self,
        num_inference_steps: int,
        *,
        denoising_strength: float = 1.0,
        image_sequence_length: int | None = None,
        sigma_shift: float | None = None,
    ) -> torch.Tensor:
        """Build the schedule (``ds_models_core.flow_match_sigmas``); returns ``timesteps``.

        ``denoising_strength`` < 1 (image-to-image) starts the unshifted grid at ``strength * sigma_max`` and
        still runs ``num_inference_steps`` steps over it. ``sigma_shift`` replaces the template's shift.
        """
        sigmas = flow_match_sigmas(
            self.template,
            num_inference_steps,
            denoising_strength=denoising_strength,
            image_sequence_length=image_sequence_length,
            sigma_shift=sigma_shift,
        )
        self._sigmas64 = sigmas
        self.sigmas = sigmas.float()
        self.timesteps = self.sigmas[:-1]
        return self.timesteps

    def model_timestep(self, index: int, scale: float = 1000.0) -> float:
        """The timestep a model is called with at step ``index``: ``sigma * scale`` (FLUX.1 and Wan: 1000)."""
        return float(self.timesteps[index]) * scale

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
        shift: float | None = None,
        sigma_range: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Sigmas to train at: ``"uniform"`` in (0, 1], or ``"logit_normal"`` (SD3's choice), then shifted.

        shift: replaces the template's (FLUX.1's resolution-dependent one, Wan's 5). sigma_range: ``(low, high)``
        keeps the shifted sigmas inside it by drawing from its preimage, with the same distribution shape there:
        a Wan2.2 A14B expert is trained only on the noise levels it samples (high noise: sigma >= boundary).
        A template with ``shift_terminal`` (Qwen-Image) trains as its reference code does: draws at or above
        1/1000, stretched so that a 1000-step grid's smallest sigma lands on the terminal value.
        """
        if sampling == "uniform":
            raw = 1 - torch.rand(batch_size, generator=generator)
        elif sampling == "logit_normal":
            raw = torch.sigmoid(torch.randn(batch_size, generator=generator))
        else:
            raise ValueError(f"sampling={sampling!r} is not supported; use 'uniform' or 'logit_normal'")
        shift = shift if shift is not None else self.template.shift_for(image_sequence_length)
        top = self.template.sigma_max
        if sigma_range is not None:
            low, high = (min(max(float(s), 0.0), 1.0) for s in sigma_range)
            # shift_sigmas(u, shift) is increasing in u; its inverse is u = s / (shift - (shift - 1) * s).
            start, end = (min(s / (shift - (shift - 1) * s), top) for s in (low, high))
            if not start < end:
                raise ValueError(f"sigma_range={sigma_range!r} holds no sigma this schedule trains at")
            return shift_sigmas(start + (end - start) * raw, shift)
        terminal = self.template.shift_terminal
        if terminal is None:
            return shift_sigmas(raw * top, shift)
        smallest = shift_sigmas(torch.tensor(top / TRAINING_GRID, dtype=torch.float64), shift)
        shifted = shift_sigmas((raw.double() * top).clamp_min(top / TRAINING_GRID), shift)
        return (1 - (1 - shifted) * ((1 - terminal) / (1 - smallest))).float()

    @staticmethod
    def training_weight(sigmas: torch.Tensor) -> torch.Tensor:
        """A bell over sigma centred at 0.5 with mean 1 over a uniform grid: mid-noise steps teach the most."""
        weight = torch.exp(-2 * (sigmas.float() - 0.5) ** 2)
        grid = torch.exp(-2 * (torch.linspace(0, 1, 1001) - 0.5) ** 2)
        low = grid.min()
        return (weight - low) / (grid - low).mean()


class FlowUniPCScheduler(FlowMatchScheduler):
    """UniPC (Zhao et al. 2023) on flow-matching sigmas, as Wan's official ``FlowUniPCMultistepScheduler`` runs it.

    The variant is fixed to the one Wan samples with: data (x0) prediction ``x0 = x - sigma * v``, the B(h) =
    expm1(-h) ("bh2") coefficients, order 2 (``order``), the UniC corrector after every model call but the first,
    and lower orders on the last steps. With ``alpha = 1 - sigma`` and ``lambda = log(alpha / sigma)``, a step
    from ``s`` to ``t`` (``h = lambda_t - lambda_s``) predicts
    ``x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) m_s - alpha_t expm1(-h) sum_k rho_k D_k``, where ``m`` are
    the x0 predictions, ``D_k = (m_{s-k} - m_s) / r_k`` their divided differences over ``r_k = (lambda_{s-k} -
    lambda_s) / h``, and ``rho`` solves UniPC's order conditions (0.5 for order 2). The corrector re-evaluates the
    previous step with the new x0 prediction in the same form. The last step (to sigma 0) returns the x0 estimate.

    Like the official solver it calls the model at integer timesteps: ``model_timestep`` is ``floor(sigma *
    1000)`` of the float64 grid (its ``timesteps`` are int64), while the update uses the exact float32 sigmas.
    """

    def __init__(self, template: FlowMatchTemplate | str, order: int = 2):
        super().__init__(template)
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order={order!r} is not supported; use 1, 2 or 3")
        self.order = order
        self._reset()

    def _reset(self) -> None:
        self._x0: list[torch.Tensor] = []  # x0 predictions of the last ``order`` steps, oldest first
        self._last_sample: torch.Tensor | None = None
        self._last_order = 0

    def set_timesteps(self, num_inference_steps: int, **kwargs: object) -> torch.Tensor:
        timesteps = super().set_timesteps(num_inference_steps, **kwargs)
        self._reset()
        return timesteps

    def model_timestep(self, index: int, scale: float = 1000.0) -> float:
        return float(math.floor(float(self._sigmas64[index]) * scale))

    def _lambda(self, index: int) -> float:
        sigma = float(self.sigmas[index])
        return math.inf if sigma == 0 else math.log(1 - sigma) - math.log(sigma)

    def _update(
        self,
        sample: torch.Tensor,
        source: int,
        target: int,
        history: list[torch.Tensor],
        rhos: list[float],
        newest: torch.Tensor | None,
    ) -> torch.Tensor:
        """``sigma_t/sigma_s x - alpha_t expm1(-h) m_s - alpha_t expm1(-h) (sum rho_k D_k [+ rho_last D_new])``."""
        sigma_s, sigma_t = float(self.sigmas[source]), float(self.sigmas[target])
        h = self._lambda(target) - self._lambda(source)
        b_h = math.expm1(-h)
        m_s = history[-1]
        result = (sigma_t / sigma_s) * sample - (1 - sigma_t) * b_h * m_s
        correction = None
        for k, rho in enumerate(rhos, start=1):
            if k < len(rhos) or newest is None:
                r_k = (self._lambda(source - k) - self._lambda(source)) / h
                term = rho / r_k * (history[-1 - k] - m_s)
            else:
                term = rho * (newest - m_s)
            correction = term if correction is None else correction + term
        if correction is not None:
            result = result - (1 - sigma_t) * b_h * correction
        return result

    def _rhos(self, source: int, target: int, order: int, corrector: bool) -> list[float]:
        """UniPC's weights: solve ``R rho = b`` with ``R[i, k] = r_k^i`` and ``b_i = i! phi_{i+1}(-h) / B(h)``."""
        if order == 1 and not corrector:
            return []
        h = self._lambda(target) - self._lambda(source)
        hh = -h
        b_h = math.expm1(hh)
        ratios = [(self._lambda(source - k) - self._lambda(source)) / h for k in range(1, order)] + [1.0]
        phi, factorial, rhs = math.expm1(hh) / hh - 1, 1, []
        for i in range(1, order + 1):
            rhs.append(phi * factorial / b_h)
            factorial *= i + 1
            phi = phi / hh - 1 / factorial
        if not corrector:  # the predictor's conditions leave out the newest point
            if order == 2:
                return [0.5]
            ratios, rhs = ratios[:-1], rhs[:-1]
        elif order == 1:
            return [0.5]
        matrix = torch.tensor([[r**i for r in ratios] for i in range(len(ratios))], dtype=torch.float64)
        return torch.linalg.solve(matrix, torch.tensor(rhs, dtype=torch.float64)).tolist()

    def step(self, velocity: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """Correct the current sample with the new prediction, then predict ``sigmas[index + 1]`` (float32 math).

        Steps must run in order from index 0 after ``set_timesteps``.
        """
        if index == 0:
            self._reset()
        x = sample.float()
        x0 = x - float(self.sigmas[index]) * velocity.float()
        if index > 0 and self._last_sample is not None:
            rhos = self._rhos(index - 1, index, self._last_order, corrector=True)
            x = self._update(self._last_sample, index - 1, index, self._x0, rhos, newest=x0)
        self._x0 = [*self._x0, x0][-self.order :]
        remaining = len(self.timesteps) - index
        order = min(self.order, remaining, len(self._x0))
        self._last_order, self._last_sample = order, x
        rhos = self._rhos(index, index + 1, order, corrector=False)
        return self._update(x, index, index + 1, self._x0, rhos, newest=None).to(sample.dtype)
