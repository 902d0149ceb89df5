"""FluxVAE against diffusers' AutoencoderKL at the FLUX config: tiny-size parity, full-size layout, tiling.

diffusers' AutoencoderKL applies neither the latent scale nor the shift; the FLUX pipelines do
``(z - shift) * scale`` after encode and ``z / scale + shift`` before decode, so the tests do the same.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from ds_models_flux import FluxVAE, FluxVAEConfig

TINY = FluxVAEConfig.tiny()


def diffusers_config(config: FluxVAEConfig) -> dict:
    n = len(config.ch_mult)
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [config.ch * m for m in config.ch_mult],
        "layers_per_block": config.num_res_blocks,
        "latent_channels": config.z_channels,
        "norm_num_groups": 32,
        "scaling_factor": config.scale_factor,
        "shift_factor": config.shift_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def diffusers_to_bfl(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the BFL ``ae.safetensors`` layout."""
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", r"up.\1.upsample."),
        (r"up_blocks\.(\d+)\.resnets\.", r"up.\1.block."),
        (r"mid_block\.resnets\.0\.", "mid.block_1."),
        (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
        (r"mid_block\.attentions\.0\.to_(q|k|v)\.", r"mid.attn_1.\1."),
        (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
        (r"conv_shortcut", "nin_shortcut"),
        (r"conv_norm_out", "norm_out"),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        # diffusers lists decoder levels from the lowest resolution; BFL indexes them like the encoder's
        new = re.sub(r"^decoder\.up\.(\d+)\.", lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.", new)
        if ".attn_1." in new and new.endswith("weight") and value.ndim == 2:  # Linear -> 1x1 conv
            value = value[:, :, None, None]
        out[new] = value
    return out


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights whose activations neither vanish nor explode through the tiny VAE."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / math.prod(p.shape[1:]) ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def smooth_texture(batch: int, size: int, period: float = 16.0) -> torch.Tensor:
    """A smooth, spatially stationary colour texture in [-0.8, 0.8] (each tile sees similar statistics)."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    w = 2 * math.pi / period
    channels = [torch.sin(w * xx), torch.cos(w * yy), torch.sin(w * (xx + yy) / 1.5)]
    return 0.8 * torch.stack(channels)[None].expand(batch, -1, -1, -1)


@pytest.fixture(scope="module")
def pair() -> tuple[FluxVAE, AutoencoderKL]:
    theirs = AutoencoderKL(**diffusers_config(TINY)).eval()
    randomize(theirs)
    ours = FluxVAE(TINY).eval()
    ours.load_state_dict(diffusers_to_bfl(theirs.state_dict(), len(TINY.ch_mult)), strict=True)
    return ours, theirs


def test_encode_parity(pair: tuple[FluxVAE, AutoencoderKL]) -> None:
    ours, theirs = pair
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = theirs.encode(images).latent_dist
        latents = ours.encode(images)
        sampled = ours.encode(images, sample=True, generator=torch.Generator().manual_seed(7))
    ref = (dist.mean - TINY.shift_factor) * TINY.scale_factor
    assert latents.shape == (2, 16, 4, 6) and ref.std() > 0.05
    torch.testing.assert_close(latents, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(7))
    expected = (dist.mean + dist.std * noise - TINY.shift_factor) * TINY.scale_factor
    torch.testing.assert_close(sampled, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (sampled - latents).abs().max() > 1e-3  # the sample is not the mean


def test_decode_parity(pair: tuple[FluxVAE, AutoencoderKL]) -> None:
    ours, theirs = pair
    latents = torch.randn(2, 16, 4, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        images = ours.decode(latents)
        ref = theirs.decode(latents / TINY.scale_factor + TINY.shift_factor).sample
        shifted = ours.decode(latents + 0.05)
    assert images.shape == (2, 3, 32, 40) and ref.std() > 0.05
    torch.testing.assert_close(images, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert (shifted - ref).abs().max() > 1e-3 * ref.abs().max()  # scale/shift errors would show


def test_one_weight_matters(pair: tuple[FluxVAE, AutoencoderKL]) -> None:
    ours, _ = pair
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    weight = ours.decoder.mid.attn_1.k.weight
    with torch.no_grad():
        before = ours.decode(latents)
        original = weight.clone()
        weight.mul_(1.5)
        after = ours.decode(latents)
        weight.copy_(original)
    assert (after - before).abs().max() > 1e-4


def test_full_size_layout_matches_diffusers_converter() -> None:
    """Our keys are those of ``ae.safetensors``: diffusers' LDM converter maps them onto its model exactly."""
    config = FluxVAEConfig.flux1()
    with torch.device("meta"):
        ours = FluxVAE(config)
        theirs = AutoencoderKL(**diffusers_config(config))
    converted = convert_ldm_vae_checkpoint(dict(ours.state_dict()), diffusers_config(config))
    theirs_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == theirs_shapes
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in diffusers_to_bfl(theirs.state_dict(), 4).items()} == ours_shapes
    # spot checks against the documented ae.safetensors key list
    assert ours_shapes["decoder.up.3.block.0.conv1.weight"] == (512, 512, 3, 3)
    assert ours_shapes["decoder.up.0.block.2.conv2.weight"] == (128, 128, 3, 3)
    assert ours_shapes["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert ours_shapes["encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert ours_shapes["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in ours_shapes
    assert "decoder.up.0.upsample.conv.weight" not in ours_shapes
    assert 83e6 < sum(math.prod(s) for s in ours_shapes.values()) < 85e6


def test_tiled_matches_untiled_on_smooth_input(pair: tuple[FluxVAE, AutoencoderKL]) -> None:
    """Tiles see their own GroupNorm statistics, attention and zero-padded borders: close to untiled, not equal.

    Stated bound, for a smooth stationary 128x128 texture and tiles of 12 latents overlapping by 4 (relative
    to the untiled output's standard deviation): encode mean |diff| < 0.1 and max < 0.75; decode mean < 0.25
    and max < 2.5. Random weights do not damp border effects as trained ones do, hence the loose maxima; the
    blending itself is exact (tests/models/core/test_tiling.py).
    """
    ours, _ = pair
    images = smooth_texture(1, 128)
    with torch.no_grad():
        latents = ours.encode(images)
        tiled = ours.encode(images, tile_size=12, tile_overlap=4)
        whole = ours.encode(images, tile_size=16)  # one tile covering everything is exactly untiled
        decoded = ours.decode(latents)
        decoded_tiled = ours.decode(latents, tile_size=12, tile_overlap=4)
    torch.testing.assert_close(whole, latents, rtol=0, atol=0)
    for out, ref, mean_bound, max_bound in ((tiled, latents, 0.1, 0.75), (decoded_tiled, decoded, 0.25, 2.5)):
        assert out.shape == ref.shape
        diff = (out - ref).abs() / ref.std()
        assert diff.mean() < mean_bound and diff.max() < max_bound, (diff.mean().item(), diff.max().item())


def test_errors() -> None:
    with pytest.raises(ValueError, match="divisible by the 32 GroupNorm groups"):
        FluxVAEConfig(ch=48)
    with pytest.raises(ValueError, match=r"ch_mult=.* must be a non-empty tuple"):
        FluxVAEConfig(ch_mult=())
    with pytest.raises(ValueError, match=r"unknown FLUX\.1 VAE preset 'sd3'"):
        FluxVAEConfig.preset("sd3")
    vae = FluxVAE(TINY)
    with pytest.raises(ValueError, match="tile_overlap=4 must be >= 0 and smaller than tile_size"):
        vae.decode(torch.zeros(1, 16, 8, 8), tile_size=4, tile_overlap=4)
    with pytest.raises(ValueError, match=r"tiled encode needs height and width divisible by 8, got \(30, 32\)"):
        vae.encode(torch.zeros(1, 3, 30, 32), tile_size=2, tile_overlap=0)
