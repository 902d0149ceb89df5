"""The flow-matching schedules equal each family's reference formula and diffusers' sampler where they agree."""

from __future__ import annotations

import math

import pytest
import torch

from ds_models_core import FlowMatchTemplate, flow_match_sigmas
from ds_pipelines import FLOW_MATCH_TEMPLATES, FlowMatchScheduler, FlowUniPCScheduler


def bfl_schedule(steps: int, sequence_length: int, shift: bool = True) -> list[float]:
    """black-forest-labs/flux sampling.get_schedule, restated from its formulas."""
    timesteps = [1 - i / steps for i in range(steps + 1)]
    if not shift:
        return timesteps
    slope = (1.15 - 0.5) / (4096 - 256)
    mu = 0.5 + slope * (sequence_length - 256)
    return [0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + (1 / t - 1)) for t in timesteps]


def wan_schedule(steps: int, shift: float) -> list[float]:
    """Wan-Video's flow solvers: linspace(0.999, 0, N+1)[:-1], shifted, then a final 0."""
    grid = [0.999 * (1 - i / steps) for i in range(steps)]
    return [shift * s / (1 + (shift - 1) * s) for s in grid] + [0.0]


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("sequence_length", [256, 1024, 4096, 6000])
def test_flux_schedule_matches_the_reference(steps, sequence_length):
    scheduler = FlowMatchScheduler("flux.1")
    timesteps = scheduler.set_timesteps(steps, image_sequence_length=sequence_length)
    expected = torch.tensor(bfl_schedule(steps, sequence_length))
    torch.testing.assert_close(scheduler.sigmas, expected.float(), rtol=1e-6, atol=1e-7)
    assert len(timesteps) == steps and scheduler.sigmas[-1] == 0


def test_flux_schedule_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    reference = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    steps, sequence_length = 20, 4096
    reference.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=calculate_shift(sequence_length))
    scheduler = FlowMatchScheduler("flux.1")
    scheduler.set_timesteps(steps, image_sequence_length=sequence_length)
    torch.testing.assert_close(scheduler.sigmas, reference.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_schnell_has_no_shift_and_sigma_shift_overrides():
    scheduler = FlowMatchScheduler("flux.1-schnell")
    scheduler.set_timesteps(4)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    flux = FlowMatchScheduler("flux.1")
    flux.set_timesteps(10, image_sequence_length=4096, sigma_shift=3.0)
    torch.testing.assert_close(
        flux.sigmas,
        torch.tensor(
            wan_schedule(10, 3.0)[:0] or [3 * s / (1 + 2 * s) for s in [1 - i / 10 for i in range(11)]]
        ).float(),
    )


@pytest.mark.parametrize("shift", [5.0, 3.0])
def test_wan_schedule_matches_the_reference(shift):
    scheduler = FlowMatchScheduler("wan")
    scheduler.set_timesteps(30, sigma_shift=shift)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor(wan_schedule(30, shift)), rtol=1e-6, atol=1e-7)
    default = FlowMatchScheduler("wan")
    default.set_timesteps(30)
    torch.testing.assert_close(default.sigmas, torch.tensor(wan_schedule(30, 5.0)), rtol=1e-6, atol=1e-7)


def test_denoising_strength_starts_lower_and_keeps_the_step_count():
    scheduler = FlowMatchScheduler("flux.1")
    full = scheduler.set_timesteps(10, image_sequence_length=1024).clone()
    partial = scheduler.set_timesteps(10, denoising_strength=0.5, image_sequence_length=1024)
    assert len(partial) == 10 and partial[0] < full[0]
    mu = 0.5 + (1.15 - 0.5) / 3840 * (1024 - 256)
    assert partial[0].item() == pytest.approx(math.exp(mu) * 0.5 / (1 + (math.exp(mu) - 1) * 0.5), rel=1e-6)


def test_euler_steps_integrate_a_straight_path_exactly():
    """On a straight flow the velocity is constant; N Euler steps land exactly on the data."""
    data, noise = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    scheduler = FlowMatchScheduler("flux.1")
    scheduler.set_timesteps(7, image_sequence_length=512)
    sample = scheduler.add_noise(data, noise, scheduler.sigmas[0])
    for index in range(len(scheduler.timesteps)):
        sample = scheduler.step(FlowMatchScheduler.velocity_target(data, noise), index, sample)
    torch.testing.assert_close(sample, data, rtol=1e-5, atol=1e-5)


def test_training_helpers():
    scheduler = FlowMatchScheduler("wan")
    generator = torch.Generator().manual_seed(0)
    sigmas = scheduler.training_sigmas(4096, generator=generator)
    assert sigmas.min() > 0 and sigmas.max() <= 1
    assert sigmas.median() > 0.7  # shift 5 moves most training steps to high noise
    logit = scheduler.training_sigmas(4096, generator=generator, sampling="logit_normal")
    assert not torch.equal(logit, sigmas)
    weights = scheduler.training_weight(torch.linspace(0, 1, 1001))
    assert weights.mean().item() == pytest.approx(1.0, rel=1e-4)
    assert weights[500] > weights[100] > weights[0] == 0
    noisy = scheduler.add_noise(torch.ones(3, 2), torch.zeros(3, 2), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(noisy[:, 0], torch.tensor([1.0, 0.5, 0.0]))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.set_timesteps(0), "num_inference_steps=0 must be an integer >= 1"),
        (lambda s: s.set_timesteps(4, denoising_strength=1.5), r"denoising_strength=1.5 must be in \(0, 1\]"),
        (lambda s: s.set_timesteps(4, sigma_shift=0), "sigma_shift=0 must be > 0"),
        (lambda s: s.set_timesteps(4), "depends on the image sequence length"),
        (lambda s: s.training_sigmas(2, sampling="cosine", image_sequence_length=1), "sampling='cosine'"),
    ],
)
def test_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call(FlowMatchScheduler("flux.1"))
    with pytest.raises(ValueError, match=r"unknown scheduler template 'sd3'; known: .*flux\.1.*wan"):
        FlowMatchScheduler("sd3")
    with pytest.raises(TypeError, match="FlowMatchTemplate or its name, got int"):
        FlowMatchScheduler(3)


def test_templates_come_from_the_installed_families():
    """A name is looked up in the family registry; a template instance needs no family at all."""
    from ds_models_flux import SCHEDULES as FLUX_SCHEDULES
    from ds_models_wan import SCHEDULES as WAN_SCHEDULES

    assert FlowMatchScheduler("flux.1").template is FLUX_SCHEDULES["flux.1"]
    assert FlowUniPCScheduler("wan").template is WAN_SCHEDULES["wan"]
    assert {**FLUX_SCHEDULES, **WAN_SCHEDULES}.items() <= dict(FLOW_MATCH_TEMPLATES).items()
    assert "flux.1-schnell" in FLOW_MATCH_TEMPLATES and len(FLOW_MATCH_TEMPLATES) >= 3
    toy = FlowMatchTemplate("toy", sigma_max=0.5, shift=2.0)
    scheduler = FlowMatchScheduler(toy)
    timesteps = scheduler.set_timesteps(6, sigma_shift=3.0)
    torch.testing.assert_close(scheduler.sigmas, flow_match_sigmas(toy, 6, sigma_shift=3.0).float(), rtol=0, atol=0)
    assert torch.equal(timesteps, scheduler.sigmas[:-1])
    with pytest.raises(TypeError):
        FlowMatchScheduler()  # the template names a family, so it has no default
