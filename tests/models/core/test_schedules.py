"""``ds_models_core.schedules``: the sigma grid of a template, without a pipeline, against the reference formulas."""

from __future__ import annotations

import math

import pytest
import torch

from ds_models_core import FlowMatchTemplate, flow_match_sigmas, shift_sigmas


def test_fixed_shift_with_terminal_dropped():
    """Wan's solvers: linspace(0.999, 0, N + 1)[:-1], shifted, then a final 0."""
    template = FlowMatchTemplate("t", sigma_max=0.999, shift=5.0, drop_terminal=True)
    sigmas = flow_match_sigmas(template, 10)
    grid = [0.999 * (1 - i / 10) for i in range(10)]
    expected = torch.tensor([5 * s / (1 + 4 * s) for s in grid] + [0.0], dtype=torch.float64)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (11,)
    torch.testing.assert_close(sigmas, expected)
    torch.testing.assert_close(
        flow_match_sigmas(template, 10, sigma_shift=3.0)[0],
        shift_sigmas(torch.tensor(0.999, dtype=torch.float64), 3.0),
    )


@pytest.mark.parametrize("sequence_length", [256, 1024, 4096])
def test_shift_linear_in_sequence_length(sequence_length):
    """BFL's get_schedule: mu linear in the image sequence length, time_shift(mu, 1, t) = exp(mu) t / (...)."""
    template = FlowMatchTemplate("t", mu_points=((256, 0.5), (4096, 1.15)))
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (sequence_length - 256)
    expected = [math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t else 0.0 for t in (1 - i / 8 for i in range(9))]
    sigmas = flow_match_sigmas(template, 8, image_sequence_length=sequence_length)
    torch.testing.assert_close(sigmas, torch.tensor(expected, dtype=torch.float64))


def test_denoising_strength_and_no_shift():
    template = FlowMatchTemplate("t")
    torch.testing.assert_close(flow_match_sigmas(template, 4).float(), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(
        flow_match_sigmas(template, 2, denoising_strength=0.5).float(), torch.tensor([0.5, 0.25, 0.0])
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_inference_steps": 0}, "num_inference_steps=0 must be an integer >= 1"),
        ({"num_inference_steps": 4, "denoising_strength": 0}, r"denoising_strength=0 must be in \(0, 1\]"),
        ({"num_inference_steps": 4, "sigma_shift": -1}, "sigma_shift=-1 must be > 0"),
        ({"num_inference_steps": 4}, "the dyn schedule depends on the image sequence length"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flow_match_sigmas(FlowMatchTemplate("dyn", mu_points=((256, 0.5), (4096, 1.15))), **kwargs)


@pytest.mark.parametrize(("steps", "sequence_length"), [(30, 6889), (8, 256), (50, 4096)])
def test_terminal_stretch_matches_diffusers(steps, sequence_length):
    """diffusers' FlowMatchEulerDiscreteScheduler with Qwen-Image's scheduler_config.json: dynamic exponential shift,
    then ``stretch_shift_to_terminal`` to 0.02, given sigmas linspace(1, 1/N, N) and mu from the token count."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    reference = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=8192,
        base_shift=0.5,
        max_shift=0.9,
        shift_terminal=0.02,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )
    mu = 0.5 + (0.9 - 0.5) / (8192 - 256) * (sequence_length - 256)
    reference.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], mu=mu)
    template = FlowMatchTemplate("t", mu_points=((256, 0.5), (8192, 0.9)), shift_terminal=0.02)
    ours = flow_match_sigmas(template, steps, image_sequence_length=sequence_length)
    assert ours[-2].item() == pytest.approx(0.02)
    assert ours[-1].item() == 0
    torch.testing.assert_close(ours.float(), reference.sigmas.float(), rtol=0, atol=1e-6)


def test_terminal_stretch_edges():
    assert flow_match_sigmas(FlowMatchTemplate("t", shift_terminal=0.02), 1).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"shift_terminal=1.5 must be in \(0, 1\)"):
        FlowMatchTemplate("t", shift_terminal=1.5)
