"""Qwen-Image's VAE is ds-models-wan's WanVAE: a diffusers AutoencoderKLQwenImage folder (save_pretrained) loads
through the "wan.vae" spec with no missing or unexpected key, takes its latent statistics from config.json, and
encodes and decodes single frames as diffusers does at fp32, with the normalisation diffusers' Qwen-Image pipelines
apply by hand ((z - mean) / std before the DiT, the inverse before decoding)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from diffusers import AutoencoderKLQwenImage

from ds_loader import detect, load_model
from ds_models_qwen_image.vae import (
    VAE_SPEC_NAME,
    WanVAE,
    WanVAEConfig,
    decode_latents,
    encode_image,
    qwen_image_vae_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Distinct statistics, so a test that read the Wan 2.1 defaults instead of config.json would fail.
MEAN = [0.1 * i - 0.8 for i in range(16)]
STD = [0.5 + 0.1 * i for i in range(16)]


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights whose activations neither vanish nor explode through the tiny VAE."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.prod(p.shape[1:]) ** 0.5)
            else:
                p.copy_(0.1 * noise)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tiny = WanVAEConfig.tiny()
    reference = AutoencoderKLQwenImage(
        base_dim=tiny.dim,
        z_dim=16,
        dim_mult=list(tiny.dim_mult),
        num_res_blocks=tiny.num_res_blocks,
        temperal_downsample=list(tiny.temperal_downsample),
        latents_mean=MEAN,
        latents_std=STD,
    ).eval()
    randomize(reference)
    folder = tmp_path_factory.mktemp("qwen_image") / "vae"
    reference.save_pretrained(folder)
    return reference, folder


def image(height: int, width: int) -> torch.Tensor:
    yy = torch.arange(height).float()[:, None]
    xx = torch.arange(width).float()[None, :]
    w = 2 * math.pi / 24
    channels = [torch.sin(w * xx + 0 * yy), torch.cos(w * yy + 0 * xx), torch.sin(w * (xx + yy) / 1.5)]
    return 0.8 * torch.stack(channels)[None]


def test_diffusers_folder_loads_through_the_wan_spec(saved):
    _, folder = saved
    [match] = detect(folder)
    assert match.spec.name == VAE_SPEC_NAME and match.format == "diffusers"
    vae = load_model(folder)  # strict: any missing or unexpected key is an error
    assert isinstance(vae, WanVAE)
    assert vae.config.latents_mean == pytest.approx(MEAN) and vae.config.latents_std == pytest.approx(STD)


def test_encode_and_decode_match_diffusers(saved):
    reference, folder = saved
    vae = load_model(folder)
    pixels = image(32, 48)
    mean = torch.tensor(MEAN).view(1, 16, 1, 1, 1)
    std = torch.tensor(STD).view(1, 16, 1, 1, 1)
    with torch.no_grad():
        expected = (reference.encode(pixels.unsqueeze(2)).latent_dist.mode() - mean) / std
        latents = encode_image(vae, pixels)
        assert latents.shape == (1, 16, 4, 6) and expected.std() > 0.05
        torch.testing.assert_close(latents, expected.squeeze(2), rtol=1e-5, atol=1e-5)
        decoded = reference.decode(latents.unsqueeze(2) * std + mean).sample.clamp(-1, 1).squeeze(2)
        ours = decode_latents(vae, latents)
    assert ours.shape == (1, 3, 32, 48)
    torch.testing.assert_close(ours, decoded, rtol=1e-5, atol=1e-5)


def test_released_statistics_are_diffusers_defaults():
    defaults = inspect.signature(AutoencoderKLQwenImage.__init__).parameters  # the released config's values
    config = qwen_image_vae_config()
    assert list(config.latents_mean) == pytest.approx(defaults["latents_mean"].default)
    assert list(config.latents_std) == pytest.approx(defaults["latents_std"].default)
    assert config.dim == defaults["base_dim"].default and config.z_dim == 16


def test_bad_shapes_are_errors():
    with torch.device("meta"):
        vae = WanVAE(WanVAEConfig.tiny())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encode_image(vae, torch.zeros(1, 3, 1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        decode_latents(vae, torch.zeros(1, 16, 1, 2, 2))
