"""Sinusoidal timestep embeddings against diffusers and Wan's float64 formula."""

import math

import pytest
import torch
from diffusers.models.embeddings import Timesteps, get_timestep_embedding

from ds_models_core import timestep_embedding

TIMESTEPS = torch.tensor([0.0, 1.0, 17.5, 250.0, 999.0])


@pytest.mark.parametrize("flip_sin_to_cos", [True, False], ids=["cos_first", "sin_first"])
@pytest.mark.parametrize("downscale_freq_shift", [0.0, 1.0])
@pytest.mark.parametrize(("dim", "scale", "max_period"), [(256, 1.0, 10000), (33, 1000.0, 10000), (64, 1.0, 500)])
def test_matches_diffusers(flip_sin_to_cos, downscale_freq_shift, dim, scale, max_period):
    t = TIMESTEPS / 1000 if scale != 1 else TIMESTEPS
    ours = timestep_embedding(
        t,
        dim,
        flip_sin_to_cos=flip_sin_to_cos,
        downscale_freq_shift=downscale_freq_shift,
        scale=scale,
        max_period=max_period,
    )
    theirs = get_timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
    assert ours.shape == (len(t), dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)


def test_orderings_differ_by_swapping_halves():
    cos_first = timestep_embedding(TIMESTEPS, 256)
    sin_first = timestep_embedding(TIMESTEPS, 256, flip_sin_to_cos=False)
    torch.testing.assert_close(cos_first, sin_first.roll(128, dims=-1))
    assert (cos_first - sin_first).abs().max() > 0.5
    assert cos_first[0, :128].eq(1).all() and cos_first[0, 128:].eq(0).all()  # t = 0: cos 1, sin 0


def test_defaults_are_the_families_setting():
    # FLUX.1/2, Qwen-Image (scale 1000 on sigma), LTX-2: diffusers Timesteps(256, True, 0).
    torch.testing.assert_close(
        timestep_embedding(TIMESTEPS / 1000, 256, scale=1000),
        Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)(TIMESTEPS / 1000),
        atol=1e-6,
        rtol=1e-6,
    )


def test_float64_matches_wan_formula():
    t = torch.tensor([999.0, 731.25, 3.0])
    half = 128
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half)
    args = torch.outer(t.double(), freqs)
    expected = torch.cat([args.cos(), args.sin()], dim=-1)
    ours64 = timestep_embedding(t, 256, dtype=torch.float64)
    assert ours64.dtype == torch.float64
    torch.testing.assert_close(ours64, expected, atol=1e-12, rtol=1e-12)
    # And float64 is not a no-op: float32 arguments near 1000 are off by ~1e-5.
    assert (timestep_embedding(t, 256).double() - expected).abs().max() > 1e-6


def test_per_token_timesteps_keep_their_shape():
    t = torch.tensor([[0.0, 500.0, 500.0], [0.0, 10.0, 10.0]])  # (batch, tokens), Wan 2.2 TI2V
    emb = timestep_embedding(t, 16)
    assert emb.shape == (2, 3, 16)
    torch.testing.assert_close(emb[1, 2], timestep_embedding(torch.tensor([10.0]), 16)[0])
    expected_first = [math.cos(10.0 * 10000 ** (-i / 8)) for i in range(8)]
    torch.testing.assert_close(emb[1, 1, :8], torch.tensor(expected_first), atol=1e-5, rtol=1e-5)
