"""patchify/unpatchify against diffusers' FLUX packing, einops, and a Wan-style Conv3d patch embedding."""

import pytest
import torch
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from einops import rearrange

from ds_models_core import patchify, unpatchify


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_2d_matches_flux_packing():
    x = randn(2, 16, 6, 10)
    tokens = patchify(x)
    assert tokens.shape == (2, 15, 64)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(x, 2, 16, 6, 10), atol=0, rtol=0)
    torch.testing.assert_close(tokens, rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2))
    # Token 1 is the patch at row 0, column 1, channel-major.
    torch.testing.assert_close(tokens[0, 1], x[0, :, 0:2, 2:4].reshape(-1))
    torch.testing.assert_close(unpatchify(tokens, (6, 10)), x, atol=0, rtol=0)


def test_2d_channels_last_round_trip():
    x = randn(1, 3, 4, 6)
    tokens = patchify(x, (2, 2), channels_last=True)
    torch.testing.assert_close(tokens[0, 0], x[0, :, 0:2, 0:2].permute(1, 2, 0).reshape(-1))
    torch.testing.assert_close(unpatchify(tokens, (4, 6), (2, 2), channels_last=True), x, atol=0, rtol=0)
    assert not torch.equal(tokens, patchify(x, (2, 2)))


def test_3d_patchify_equals_wan_conv3d_patch_embedding():
    x = randn(2, 4, 3, 6, 8)
    conv = torch.nn.Conv3d(4, 12, kernel_size=(1, 2, 2), stride=(1, 2, 2), bias=False)
    with torch.no_grad():
        expected = conv(x).flatten(2).transpose(1, 2)  # (b, f*h*w, dim)
        tokens = patchify(x, (1, 2, 2))
        ours = tokens @ conv.weight.reshape(12, -1).T
    assert tokens.shape == (2, 3 * 3 * 4, 16)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_3d_unpatchify_matches_wan_head_layout():
    tokens = randn(2, 2 * 3 * 4, 1 * 2 * 2 * 5)  # Wan head output: (x y z c) per token
    ours = unpatchify(tokens, (2, 6, 8), (1, 2, 2), channels_last=True)
    expected = rearrange(tokens, "b (f h w) (x y z c) -> b c (f x) (h y) (w z)", f=2, h=3, w=4, x=1, y=2, z=2)
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)
    assert ours.shape == (2, 5, 2, 6, 8)
    torch.testing.assert_close(patchify(ours, (1, 2, 2), channels_last=True), tokens, atol=0, rtol=0)


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="not divisible"):
        patchify(randn(1, 4, 5, 6))
    with pytest.raises(ValueError, match="5-D latent"):
        patchify(randn(1, 4, 4, 6), (1, 2, 2))
    with pytest.raises(ValueError, match="2 \\(image\\) or 3 \\(video\\)"):
        patchify(randn(1, 4, 4), (2,))
    with pytest.raises(ValueError, match="divisible"):
        unpatchify(randn(1, 6, 16), (5, 6))
