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
