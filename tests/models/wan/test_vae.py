"""WanVAE (2.1) and WanVAE22 (2.2) against diffusers' AutoencoderKLWan: parity, layouts, streaming, tiling, errors.

diffusers' AutoencoderKLWan returns raw Gaussian moments and decodes raw latents; its pipelines normalise with
``(mu - latents_mean) / latents_std`` (and the inverse before decode), as the official wrapper does and as our
``encode``/``decode`` do inside, so the tests apply the same normalisation to the diffusers side. One compute
thread: the autouse fixture of conftest.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors.torch import save_file

from ds_loader import load_model, open_checkpoints
from ds_models_wan.vae import CACHE_T, WanVAE, WanVAEConfig
from ds_models_wan.vae22 import WanVAE22, WanVAE22Config
from ds_models_wan.vae_specs import VAE21_SPEC, VAE22_SPEC, detect_vae21, detect_vae22, diffusers_to_official

TINY21 = WanVAEConfig.tiny()
TINY22 = WanVAE22Config.tiny()


def diffusers_config(config: WanVAEConfig | WanVAE22Config) -> dict:
    common = {
        "base_dim": config.dim,
        "z_dim": config.z_dim,
        "dim_mult": list(config.dim_mult),
        "num_res_blocks": config.num_res_blocks,
        "temperal_downsample": list(config.temperal_downsample),
        "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
    }
    if isinstance(config, WanVAEConfig):
        return common
    extra = {"is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16}
    return {**common, "decoder_base_dim": config.dec_dim, **extra}


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


def normalised(ours: WanVAE | WanVAE22, mu: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1, 1)
    return (mu - ours.latents_mean.view(shape)) / ours.latents_std.view(shape)


def raw(ours: WanVAE | WanVAE22, z: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1, 1)
    return z * ours.latents_std.view(shape) + ours.latents_mean.view(shape)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and expected.std() > 0.05
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def smooth_video(frames: int, height: int, width: int) -> torch.Tensor:
    """A smooth moving colour pattern in [-0.8, 0.8]."""
    t = torch.arange(frames).float()[:, None, None]
    yy = torch.arange(height).float()[None, :, None]
    xx = torch.arange(width).float()[None, None, :]
    w = 2 * math.pi / 24
    channels = [torch.sin(w * (xx + 2 * t)), torch.cos(w * yy + 0 * xx), torch.sin(w * (xx + yy - t) / 1.5)]
    return 0.8 * torch.stack([c.expand(frames, height, width) for c in channels])[None]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """diffusers folders (save_pretrained) and official-layout files for both tiny VAEs."""
    root = tmp_path_factory.mktemp("wan_vae")
    out = {}
    for name, config, cls in (("21", TINY21, WanVAE), ("22", TINY22, WanVAE22)):
        theirs = AutoencoderKLWan(**diffusers_config(config)).eval()
        randomize(theirs, seed=int(name))
        theirs.save_pretrained(root / f"diffusers{name}")
        out[f"diffusers{name}"] = root / f"diffusers{name}"
        ours = cls(config).eval()
        randomize(ours, seed=100 + int(name))
        state = {k: v.contiguous() for k, v in ours.state_dict().items()}
        out[f"pth{name}"] = root / f"Wan2.{name[1]}_VAE.pth"
        torch.save(state, out[f"pth{name}"])
        out[f"safetensors{name}"] = root / f"wan_2.{name[1]}_vae.safetensors"  # the ComfyUI repack
        save_file(state, out[f"safetensors{name}"])
    return out


def test_21_diffusers_folder_parity(files: dict[str, Path]) -> None:
    """A diffusers folder through ds_loader: 9 frames -> 3 latent frames (two causal chunks after the first)."""
    theirs = AutoencoderKLWan.from_pretrained(files["diffusers21"]).eval()
    ours = load_model(files["diffusers21"], spec=VAE21_SPEC)
    assert isinstance(ours, WanVAE) and ours.config == TINY21
    video = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = torch.randn(1, 16, 3, 2, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        encoded = ours.encode(video)
        ref_encoded = normalised(ours, theirs.encode(video).latent_dist.mode())
        decoded = ours.decode(latents)
        ref_decoded = theirs.decode(raw(ours, latents)).sample
        shifted = ours.decode(latents + 0.05)
    assert encoded.shape == (1, 16, 3, 2, 3) and decoded.shape == (1, 3, 9, 16, 24)
    close(encoded, ref_encoded)
    close(decoded, ref_decoded)
    assert (shifted - ref_decoded).abs().max() > 1e-3  # the normalisation is not a no-op


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_21_official_file_parity_through_diffusers_converter(files: dict[str, Path], suffix: str) -> None:
    """Our official-layout file, read by ds_loader (.pth via weights_only), against diffusers given the same
    tensors through its own single-file converter."""
    ours = load_model(files[f"{suffix}21"], spec=VAE21_SPEC)
    theirs = AutoencoderKLWan(**diffusers_config(TINY21)).eval()
    theirs.load_state_dict(convert_wan_vae_to_diffusers(dict(ours.state_dict())), strict=True)
    video = torch.rand(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        close(ours.encode(video), normalised(ours, theirs.encode(video).latent_dist.mode()))
        latents = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(4))
        close(ours.decode(latents), theirs.decode(raw(ours, latents)).sample)


def test_22_diffusers_folder_parity(files: dict[str, Path]) -> None:
    theirs = AutoencoderKLWan.from_pretrained(files["diffusers22"]).eval()
    ours = load_model(files["diffusers22"], spec=VAE22_SPEC)
    assert isinstance(ours, WanVAE22) and ours.config == TINY22
    video = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(5)) * 2 - 1
    latents = torch.randn(1, 48, 3, 2, 3, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        encoded = ours.encode(video)
        close(encoded, normalised(ours, theirs.encode(video).latent_dist.mode()))
        decoded = ours.decode(latents)
        close(decoded, theirs.decode(raw(ours, latents)).sample)
    assert encoded.shape == (1, 48, 3, 2, 3) and decoded.shape == (1, 3, 9, 32, 48)


def test_22_official_files_load_unconverted(files: dict[str, Path]) -> None:
    """The .pth and its safetensors copy give the same model; renaming its tensors into diffusers' names (the
    inverse of our recipe) gives a diffusers model with the same outputs."""
    ours = load_model(files["pth22"], spec=VAE22_SPEC)
    copy = load_model(files["safetensors22"], spec=VAE22_SPEC)
    theirs = AutoencoderKLWan(**diffusers_config(TINY22)).eval()
    names = {diffusers_to_official(k, theirs.state_dict().__contains__): k for k in theirs.state_dict()}
    theirs.load_state_dict({names[k]: v for k, v in ours.state_dict().items()}, strict=True)
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        encoded = ours.encode(video)
        torch.testing.assert_close(copy.encode(video), encoded, rtol=0, atol=0)
        close(encoded, normalised(ours, theirs.encode(video).latent_dist.mode()))
        decoded = ours.decode(encoded)
        one_tile = ours.decode(encoded, tiled=True, tile_size=(2, 2), tile_stride=(2, 2))
        tiles = ours.decode(encoded, tiled=True, tile_size=(1, 1), tile_stride=(1, 1))
    torch.testing.assert_close(one_tile, decoded, rtol=0, atol=0)
    assert tiles.shape == decoded.shape == (1, 3, 5, 32, 32) and (tiles - decoded).abs().max() > 0


def _shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_21_full_size_layout() -> None:
    """Our released config on meta: diffusers' own converter maps our keys onto AutoencoderKLWan exactly, and our
    recipe maps theirs back onto ours."""
    with torch.device("meta"):
        ours = WanVAE(WanVAEConfig.wan21())
        theirs = AutoencoderKLWan()
    theirs_shapes = _shapes(theirs.state_dict())
    assert _shapes(convert_wan_vae_to_diffusers(dict(ours.state_dict()))) == theirs_shapes
    ours_shapes = _shapes(ours.state_dict())
    has = theirs_shapes.__contains__
    assert {diffusers_to_official(k, has): s for k, s in theirs_shapes.items()} == ours_shapes
    assert ours_shapes["decoder.upsamples.3.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert ours_shapes["encoder.downsamples.5.time_conv.weight"] == (192, 192, 3, 1, 1)
    assert ours_shapes["conv1.weight"] == (32, 32, 1, 1, 1) and ours_shapes["encoder.head.0.gamma"] == (384, 1, 1, 1)
    assert ours_shapes["decoder.middle.1.norm.gamma"] == (384, 1, 1)
    assert 126e6 < sum(math.prod(s) for s in ours_shapes.values()) < 128e6


@pytest.mark.parametrize(
    "config",
    [WanVAE22Config.wan22(), WanVAE22Config(dim=16, dec_dim=24, num_res_blocks=3), WanVAEConfig(num_res_blocks=1)],
    ids=["wan2.2", "2.2-three-blocks", "2.1-one-block"],
)
def test_layouts_through_the_recipe(config: WanVAEConfig | WanVAE22Config) -> None:
    cls = WanVAE22 if isinstance(config, WanVAE22Config) else WanVAE
    with torch.device("meta"):
        ours = cls(config)
        theirs = AutoencoderKLWan(**diffusers_config(config))
    theirs_shapes = _shapes(theirs.state_dict())
    has = theirs_shapes.__contains__
    assert {diffusers_to_official(k, has): s for k, s in theirs_shapes.items()} == _shapes(ours.state_dict())
    if config == WanVAE22Config.wan22():
        shapes = _shapes(ours.state_dict())
        assert shapes["encoder.conv1.weight"] == (160, 12, 3, 3, 3)
        assert shapes["decoder.upsamples.0.upsamples.3.time_conv.weight"] == (2048, 1024, 3, 1, 1)
        assert shapes["decoder.head.2.weight"] == (12, 256, 3, 3, 3)
        assert 700e6 < sum(math.prod(s) for s in shapes.values()) < 710e6


@pytest.mark.parametrize(
    ("key", "detect", "other", "fmt", "config"),
    [
        ("pth21", detect_vae21, detect_vae22, "official", TINY21),
        ("safetensors21", detect_vae21, detect_vae22, "official", TINY21),
        ("diffusers21", detect_vae21, detect_vae22, "diffusers", TINY21),
        ("pth22", detect_vae22, detect_vae21, "official", TINY22),
        ("diffusers22", detect_vae22, detect_vae21, "diffusers", TINY22),
    ],
)
def test_detection(files: dict[str, Path], key, detect, other, fmt, config) -> None:
    view = open_checkpoints(files[key])[0].view()
    found = detect(view)
    assert found.format == fmt and found.config == config
    assert other(view).closeness >= 0.5  # the other Wan VAE: a near miss, not a match
    assert not hasattr(other(view), "format")


def test_detection_rejects_other_vaes_and_reads_diffusers_statistics(tmp_path: Path) -> None:
    with torch.device("meta"):
        sd_vae = AutoencoderKL()
    state = {k: torch.zeros(1) for k in sd_vae.state_dict()}
    save_file(state, tmp_path / "sd.safetensors")
    view = open_checkpoints(tmp_path / "sd.safetensors")[0].view()
    assert not hasattr(detect_vae21(view), "format") and not hasattr(detect_vae22(view), "format")
    config = dict(diffusers_config(TINY21), latents_mean=[0.5] * 16, latents_std=[2.0] * 16)
    AutoencoderKLWan(**config).save_pretrained(tmp_path / "vae")
    found = detect_vae21(open_checkpoints(tmp_path / "vae")[0].view())
    assert found.config.latents_mean == (0.5,) * 16 and found.config.latents_std == (2.0,) * 16


@pytest.fixture(scope="module")
def tiny21() -> WanVAE:
    model = WanVAE(TINY21).eval()
    randomize(model, seed=3)
    return model


def test_streaming_is_causal_and_bounded(tiny21: WanVAE) -> None:
    """Frames never see the future: the first latent frames of a longer video equal those of its prefix, and the
    decode of a prefix of latents equals the first frames of the full decode. Each cached entry holds at most
    CACHE_T frames, so memory does not grow with the video length."""
    video = torch.rand(1, 3, 13, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with torch.no_grad():
        full, prefix = tiny21.encode(video), tiny21.encode(video[:, :, :5])
        decoded, decoded_prefix = tiny21.decode(full), tiny21.decode(full[:, :, :2])
    assert full.shape[2] == 4
    torch.testing.assert_close(full[:, :, :2], prefix, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded[:, :, :5], decoded_prefix, rtol=1e-5, atol=1e-5)
    cache: dict = {}
    x = tiny21.conv2(full)
    with torch.no_grad():
        for i in range(x.shape[2]):
            tiny21.decoder(x[:, :, i : i + 1], cache, first=i == 0)
            assert all(v is None or v.shape[2] <= CACHE_T for v in cache.values())


def test_tiled_matches_untiled_on_smooth_video(tiny21: WanVAE) -> None:
    """Tiles see zero-padded borders and their own attention: close to untiled, not equal.

    Stated bound, for a smooth moving pattern of 5 frames at 64x64 pixels (8x8 latents), tiles of 6x6 latents
    every 3x3, relative to the untiled output's standard deviation: encode mean |diff| < 0.1, max < 1; decode
    mean < 0.2, max < 2 (measured 0.070 / 0.76 and 0.143 / 1.35; random weights do not damp border effects as
    trained ones do). The blending itself is exact (tests/models/core/test_tiling.py).
    """
    video = smooth_video(5, 64, 64)
    with torch.no_grad():
        latents = tiny21.encode(video)
        tiled = tiny21.encode(video, tiled=True, tile_size=(6, 6), tile_stride=(3, 3))
        whole = tiny21.encode(video, tiled=True, tile_size=(8, 8), tile_stride=(8, 8))  # one tile: exactly untiled
        decoded = tiny21.decode(latents)
        decoded_tiled = tiny21.decode(latents, tiled=True, tile_size=(6, 6), tile_stride=(3, 3))
    torch.testing.assert_close(whole, latents, rtol=0, atol=0)
    for out, ref, mean_bound, max_bound in ((tiled, latents, 0.1, 1.0), (decoded_tiled, decoded, 0.2, 2.0)):
        assert out.shape == ref.shape
        diff = (out - ref).abs() / ref.std()
        assert diff.mean() < mean_bound and diff.max() < max_bound, (diff.mean().item(), diff.max().item())
        assert diff.max() > 0  # the tiles really are separate


def test_configs_and_attributes() -> None:
    assert WanVAEConfig.preset("wan2.1") == WanVAEConfig() and WanVAE22Config.preset("wan2.2") == WanVAE22Config()
    assert WanVAEConfig.preset("tiny") == TINY21 and WanVAE22Config.preset("tiny-2.2") == TINY22
    with torch.device("meta"):
        v21, v22 = WanVAE(TINY21), WanVAE22(TINY22)
    assert (v21.z_dim, v21.spatial_compression, v21.temporal_compression) == (16, 8, 4)
    assert (v22.z_dim, v22.spatial_compression, v22.temporal_compression) == (48, 16, 4)
    assert v21.latents_std.shape == (16,) and v22.latents_mean.shape == (48,)
    assert v21.latents_mean[0].item() == pytest.approx(-0.7571) and v22.latents_std[-1].item() == pytest.approx(0.7744)
    assert not any(k.startswith("latents") for k in v21.state_dict())


def test_errors(tiny21: WanVAE) -> None:
    with pytest.raises(ValueError, match=r"4k \+ 1 frames.*got 8, the nearest valid counts are 5 or 9"):
        tiny21.encode(torch.zeros(1, 3, 8, 16, 16))
    with pytest.raises(ValueError, match=r"shape \(B, 3, F, H, W\), got \(1, 4, 5, 16, 16\)"):
        tiny21.encode(torch.zeros(1, 4, 5, 16, 16))
    with pytest.raises(ValueError, match="divisible by 8, got 16x20"):
        tiny21.encode(torch.zeros(1, 3, 5, 16, 20))
    with pytest.raises(ValueError, match=r"latents of shape \(B, 16, T, h, w\), got \(1, 48, 2, 2, 2\)"):
        tiny21.decode(torch.zeros(1, 48, 2, 2, 2))
    with pytest.raises(ValueError, match="stride <= size"):
        tiny21.decode(torch.zeros(1, 16, 1, 2, 2), tiled=True, tile_size=(4, 4), tile_stride=(5, 2))
    with pytest.raises(ValueError, match=r"unknown Wan 2\.1 VAE preset 'wan2\.2'"):
        WanVAEConfig.preset("wan2.2")
    with pytest.raises(ValueError, match="latents_mean has 16 values; z_dim=8"):
        WanVAEConfig(z_dim=8)
    with pytest.raises(ValueError, match="exactly two levels must halve time"):
        WanVAEConfig(temperal_downsample=(True, True, True))
