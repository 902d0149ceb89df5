"""The Wan 2.2 video VAE (z 48, 16x spatial, 4x temporal), with the parameter names of ``Wan2.2_VAE.pth``.

The math follows Wan-Video/Wan2.2 ``wan/modules/vae2_2.py``: pixels are first folded 2x2 into 12 channels
(``patchify``), then the 2.1 building blocks run inside residual levels whose shortcut is parameter-free: an average
of channel groups over the downsampled 2x2(x2) neighbourhood in the encoder (``AvgDown3D``), a channel-to-space
duplication in the decoder (``DupUp3D``). The encoder (``dim`` 160) and decoder (``dec_dim`` 256) have different
widths. Streaming, tiling and normalisation are those of the 2.1 VAE (``vae.WanVideoVAEBase``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ds_models_wan.vae import (
    CausalConv3d,
    Resample,
    ResidualBlock,
    StreamCache,
    WanVideoVAEBase,
    _check_sizes,
    _check_stats,
    head_layers,
    middle_blocks,
    run_head,
    run_layers,
)

__all__ = ["WAN22_LATENTS_MEAN", "WAN22_LATENTS_STD", "WanVAE22", "WanVAE22Config"]

WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip

PATCH = 2  # pixels folded into channels per side before the encoder (and unfolded after the decoder)


@dataclass(frozen=True)
class WanVAE22Config:
    """Sizes of the Wan 2.2 VAE; names as in the official ``WanVAE_`` of ``vae2_2.py``."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = WAN22_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN22_LATENTS_STD

    PRESETS: ClassVar[tuple[str, ...]] = ("wan2.2", "tiny-2.2")

    def __post_init__(self) -> None:
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_sizes(self, ("dim", "dec_dim", "z_dim", "num_res_blocks"))
        if not self.dim_mult or any(not isinstance(m, int) or m <= 0 for m in self.dim_mult):
            raise ValueError(
                f"WanVAE22Config.dim_mult={self.dim_mult!r} must be a non-empty tuple of positive integers"
            )
        if len(self.temperal_downsample) != len(self.dim_mult) - 1 or sum(self.temperal_downsample) != 2:
            raise ValueError(
                f"WanVAE22Config.temperal_downsample={self.temperal_downsample!r} needs one flag per downsampling "
                f"level ({len(self.dim_mult) - 1}), two of them True (4x temporal compression)"
            )
        dims = [self.dim * m for m in (1, *self.dim_mult)]
        for i in range(len(self.dim_mult) - 1):  # AvgDown3D averages channel groups: widths must divide evenly
            factor = (2 if self.temperal_downsample[i] else 1) * 4
            if dims[i] * factor % dims[i + 1]:
                raise ValueError(f"WanVAE22Config: width {dims[i]} x {factor} is not a multiple of {dims[i + 1]}")
        _check_stats(self)

    @property
    def spatial_compression(self) -> int:
        return PATCH * 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def wan22(cls) -> WanVAE22Config:
        """The released ``Wan2.2_VAE.pth`` of TI2V-5B (about 705 M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> WanVAE22Config:
        """The same architecture at test size: encoder widths 16..64, decoder 16..64, one block per level, z 48."""
        return cls(dim=16, dec_dim=16, num_res_blocks=1)

    @classmethod
    def preset(cls, name: str) -> WanVAE22Config:
        """The config of a preset by name (one of ``WanVAE22Config.PRESETS``)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown Wan 2.2 VAE preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls.wan22() if name == "wan2.2" else cls.tiny()


def avg_down(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """The parameter-free encoder shortcut: fold each (t, 2, 2) neighbourhood into channels, then average groups
    of consecutive channels down to ``out_dim``. A single leading frame is padded with one zero frame."""
    pad_t = (factor_t - x.shape[2] % factor_t) % factor_t
    x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // factor_t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # channel order (c, dt, dh, dw)
    x = x.reshape(b, out_dim, -1, t // factor_t, h // factor_s, w // factor_s)
    return x.mean(dim=2)


def dup_up(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int, first: bool) -> torch.Tensor:
    """The parameter-free decoder shortcut: repeat channels, then unfold them into (t, 2, 2) neighbourhoods. On the
    first latent frame only the last of the ``factor_t`` frames is kept (the causal first frame)."""
    b, c, t, h, w = x.shape
    repeats = out_dim * factor_t * factor_s * factor_s // c
    x = x.repeat_interleave(repeats, dim=1)
    x = x.reshape(b, out_dim, factor_t, factor_s, factor_s, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    x = x.reshape(b, out_dim, t * factor_t, h * factor_s, w * factor_s)
    return x[:, :, factor_t - 1 :] if first else x


class DownLevel(nn.Module):
    """One encoder level: ``downsamples`` (residual blocks, then an optional ``Resample``) plus ``avg_down``."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, down: bool, down_time: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(blocks)]
        if down:
            layers.append(Resample(out_dim, "downsample3d" if down_time else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.out_dim = out_dim
        self.factor_t = 2 if down_time else 1
        self.factor_s = 2 if down else 1

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        shortcut = avg_down(x, self.out_dim, self.factor_t, self.factor_s)
        return run_layers(self.downsamples, x, cache) + shortcut


class UpLevel(nn.Module):
    """One decoder level: ``upsamples`` (residual blocks, then an optional ``Resample`` keeping the width) plus
    ``dup_up`` when the level upsamples."""

    def __init__(self, in_dim: int, out_dim: int, blocks: int, up: bool, up_time: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim) for j in range(blocks)]
        if up:
            layers.append(Resample(out_dim, "upsample3d" if up_time else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)
        self.up = up
        self.out_dim = out_dim
        self.factor_t = 2 if up_time else 1

    def forward(self, x: torch.Tensor, cache: StreamCache, first: bool) -> torch.Tensor:
        main = run_layers(self.upsamples, x, cache)
        if not self.up:
            return main
        return main + dup_up(x, self.out_dim, self.factor_t, 2, first)


class Encoder22(nn.Module):
    """Patchified pixels (B, 12, T, H / 2, W / 2) of one chunk to moments (B, 2 z, T', H / 16, W / 16)."""

    def __init__(self, config: WanVAE22Config) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        last = len(config.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(
            *(
                DownLevel(
                    dims[i], dims[i + 1], config.num_res_blocks, i < last, i < last and config.temperal_downsample[i]
                )
                for i in range(len(config.dim_mult))
            )
        )
        self.middle = middle_blocks(dims[-1])
        self.head = head_layers(dims[-1], 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = run_layers(self.downsamples, self.conv1(x, cache), cache)
        return run_head(self.head, run_layers(self.middle, x, cache), cache)


class Decoder22(nn.Module):
    """Latents (B, z, 1, h, w) of one latent frame to patchified pixels (B, 12, 1 or 4, 8h, 8w)."""

    def __init__(self, config: WanVAE22Config) -> None:
        super().__init__()
        mult = config.dim_mult
        dims = [config.dec_dim * m for m in (mult[-1], *reversed(mult))]
        up_time = tuple(reversed(config.temperal_downsample))
        last = len(mult) - 1
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        self.upsamples = nn.Sequential(
            *(
                UpLevel(dims[i], dims[i + 1], config.num_res_blocks + 1, i < last, i < last and up_time[i])
                for i in range(len(mult))
            )
        )
        self.head = head_layers(dims[-1], 3 * PATCH * PATCH)

    def forward(self, x: torch.Tensor, cache: StreamCache, first: bool = False) -> torch.Tensor:
        x = run_layers(self.middle, self.conv1(x, cache), cache)
        for level in self.upsamples:
            x = level(x, cache, first)
        return run_head(self.head, x, cache)


class WanVAE22(WanVideoVAEBase):
    """The Wan 2.2 VAE (``Wan2.2_VAE.pth``, TI2V-5B): the ``WanVAE`` interface with z 48 and 16x spatial compression.

    Parameter names are the official ones (``encoder.downsamples.N.downsamples.M``,
    ``decoder.upsamples.N.upsamples.M``, ``conv1``, ``conv2``...), so the official file loads with no conversion.
    """

    patch_size = PATCH

    def __init__(self, config: WanVAE22Config) -> None:
        super().__init__()
        self.config = config
        self.z_dim = config.z_dim
        self.spatial_compression = config.spatial_compression
        self.encoder = Encoder22(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder22(config)
