"""Wan's sampling math: the official sigma grid, UniPC against diffusers, the expert split, and the size guards."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ds_pipelines import FlowMatchScheduler, FlowUniPCScheduler
from ds_pipelines.wan_video import check_video_size


def official_unipc_grid(steps: int, shift: float) -> tuple[list[float], list[int]]:
    """Wan2.1 FlowUniPCMultistepScheduler.set_timesteps, restated: its training sigmas run from 0.999 to 0, so
    linspace(0.999, 0, N+1)[:-1] (float64), shifted, then a terminal 0; model timesteps int64(sigma * 1000)."""
    grid = np.linspace(1 - 1 / 1000, 0, steps + 1)[:-1]
    sigmas = shift * grid / (1 + (shift - 1) * grid)
    return [*sigmas.tolist(), 0.0], (sigmas * 1000).astype(np.int64).tolist()


@pytest.mark.parametrize("steps", [1, 4, 40, 50])
@pytest.mark.parametrize("shift", [1.0, 5.0, 12.0, 16.0])
@pytest.mark.parametrize("sampler", [FlowMatchScheduler, FlowUniPCScheduler])
def test_grid_is_the_official_one(steps, shift, sampler):
    scheduler = sampler("wan")
    scheduler.set_timesteps(steps, sigma_shift=shift)
    sigmas, integer_timesteps = official_unipc_grid(steps, shift)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor(sigmas, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    assert scheduler.sigmas[0] < 1 and scheduler.sigmas[-1] == 0 and len(scheduler.timesteps) == steps
    model_timesteps = [scheduler.model_timestep(index) for index in range(steps)]
    if sampler is FlowUniPCScheduler:  # the official solver calls the DiT at int64 timesteps
        assert model_timesteps == integer_timesteps
    else:  # Euler, as DiffSynth and diffusers' flow-matching Euler: the exact sigma * 1000
        assert model_timesteps == pytest.approx([s * 1000 for s in sigmas[:-1]], rel=1e-6)


def _toy_velocity(sample: torch.Tensor, timestep: float) -> torch.Tensor:
    weight = torch.linspace(-0.6, 0.8, 16).view(4, 4)
    return torch.einsum("ij,bjfhw->bifhw", weight, sample) * (1 + timestep / 1000) + 0.3 * torch.cos(sample)


@pytest.mark.parametrize(
    ("steps", "shift", "strength", "order"),
    [(8, 5.0, 1.0, 2), (3, 12.0, 1.0, 2), (6, 3.0, 0.6, 2), (5, 5.0, 1.0, 3), (1, 5.0, 1.0, 2)],
)
def test_unipc_matches_diffusers(steps, shift, strength, order):
    """Our UniPC (written from the formula) against diffusers' UniPCMultistepScheduler on flow sigmas: the
    same integer timesteps and the same samples along a nonlinear toy ODE, predictor and corrector included."""
    from diffusers import UniPCMultistepScheduler

    ours = FlowUniPCScheduler("wan", order=order)
    ours.set_timesteps(steps, sigma_shift=shift, denoising_strength=strength)
    reference = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=order
    )
    reference.set_timesteps(sigmas=np.linspace(0.999 * strength, 0, steps + 1)[:-1])
    torch.testing.assert_close(ours.sigmas, reference.sigmas, rtol=1e-6, atol=1e-7)
    sample = torch.randn(1, 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    theirs = sample.clone()
    euler = FlowMatchScheduler("wan")
    euler.set_timesteps(steps, sigma_shift=shift, denoising_strength=strength)
    by_euler = sample.clone()
    for index in range(steps):
        assert ours.model_timestep(index) == int(reference.timesteps[index])
        sample = ours.step(_toy_velocity(sample, ours.model_timestep(index)), index, sample)
        theirs = reference.step(
            _toy_velocity(theirs, float(reference.timesteps[index])), reference.timesteps[index], theirs
        ).prev_sample
        by_euler = euler.step(_toy_velocity(by_euler, euler.model_timestep(index)), index, by_euler)
        torch.testing.assert_close(sample, theirs, rtol=1e-5, atol=1e-5)
    if steps > 2:  # the comparison can tell solvers apart
        assert (sample - by_euler).abs().max() > 1e-3


def test_unipc_restarts_and_keeps_dtype():
    scheduler = FlowUniPCScheduler("wan")
    scheduler.set_timesteps(4)
    sample = torch.randn(1, 4, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):  # a second pass from index 0 starts a fresh history
        x = sample.clone()
        for index in range(4):
            x = scheduler.step(_toy_velocity(x, scheduler.model_timestep(index)), index, x)
        runs.append(x)
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    half = scheduler.step(torch.ones(1, 4, 1, 2, 2, dtype=torch.bfloat16), 0, sample.bfloat16())
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="UniPC order=4 is not supported"):
        FlowUniPCScheduler("wan", order=4)


@pytest.mark.parametrize(
    ("frames", "height", "width", "multiple", "message"),
    [
        (80, 64, 64, 16, "num_frames=80 is not of the form 4k\\+1 .* the nearest valid counts are 77 and 81"),
        (83, 64, 64, 16, "the nearest valid counts are 81 and 85"),
        (0, 64, 64, 16, "num_frames=0 must be a positive integer"),
        (81, 72, 64, 16, "height=72 is not a multiple of 16 .* the nearest valid sizes are 64 and 80"),
        (81, 64, 48, 32, "width=48 is not a multiple of 32 .* the nearest valid sizes are 32 and 64"),
        (81, 64, 8, 16, "width=8 must be an integer of at least 16"),
    ],
)
def test_size_guards(frames, height, width, multiple, message):
    with pytest.raises(ValueError, match=message):
        check_video_size(height, width, frames, multiple)


def test_valid_sizes_pass():
    for frames in (1, 5, 81, 121):
        check_video_size(480, 832, frames, 16)
    check_video_size(704, 1280, 121, 32)
    assert math.isclose(FlowMatchScheduler("wan").template.sigma_max, 0.999)
