"""The FLUX.1 VAE (16 latent channels, 8x down), with the parameter names of BFL's ``ae.safetensors``.

The math follows black-forest-labs/flux ``modules/autoencoder.py``: an SD-style KL autoencoder whose
encoder returns the mean and log-variance of a diagonal Gaussian; latents are scaled and shifted so the
DiT sees roughly unit variance. Z-Image reuses this VAE.

Tiled encode/decode bounds memory at high resolution: overlapping tiles of the latent grid are run separately
and blended with linear ramps over the overlap (``ds_models_core.tiling``). GroupNorm statistics and the
mid-block attention then see one tile instead of the whole image, so tiled results differ slightly from untiled
ones (see ``encode``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ds_models_core import attention, run_tiled

__all__ = ["FluxVAE", "FluxVAEConfig"]

GROUPS = 32  # GroupNorm groups everywhere in the VAE
NORM_EPS = 1e-6


@dataclass(frozen=True)
class FluxVAEConfig:
    """Sizes of the FLUX.1 VAE; field names are those of BFL's ``AutoEncoderParams``."""

    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # one resolution level each; all but the last halve the size
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    PRESETS: ClassVar[tuple[str, ...]] = ("flux1", "tiny")

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        for name in ("in_channels", "out_ch", "ch", "num_res_blocks", "z_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"FluxVAEConfig.{name}={value!r} must be a positive integer")
        if not self.ch_mult or any(not isinstance(m, int) or m <= 0 for m in self.ch_mult):
            raise ValueError(f"FluxVAEConfig.ch_mult={self.ch_mult!r} must be a non-empty tuple of positive integers")
        widths = [self.ch * m for m in (1, *self.ch_mult)]
        if any(w % GROUPS for w in widths):
            raise ValueError(
                f"FluxVAEConfig: every width ch * ch_mult (here {widths}) must be divisible by the {GROUPS} "
                f"GroupNorm groups; choose ch as a multiple of {GROUPS}"
            )
        if not self.scale_factor > 0:
            raise ValueError(f"FluxVAEConfig.scale_factor={self.scale_factor!r} must be positive (FLUX.1: 0.3611)")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for FLUX.1)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def flux1(cls) -> FluxVAEConfig:
        """The released FLUX.1 VAE (``ae.safetensors``), about 84 M parameters."""
        return cls()

    @classmethod
    def tiny(cls) -> FluxVAEConfig:
        """The same architecture at test size: widths 32/32/64/64, 1 resnet per level, 16 latent channels."""
        return cls(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)

    @classmethod
    def preset(cls, name: str) -> FluxVAEConfig:
        """The config of a preset by name (one of ``FluxVAEConfig.PRESETS``)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown FLUX.1 VAE preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return getattr(cls, name)()


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """Two (GroupNorm, SiLU, 3x3 conv) steps and a residual; ``nin_shortcut`` (1x1) when the width changes."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-conv projections (``q``, ``k``, ``v``, ``proj_out``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, :, None] for conv in (self.q, self.k, self.v))
        # One head of the full width (512): no FlashAttention/Sage kernel takes head_dim > 256, so this call
        # stays on SDPA whatever DIFFSYNTH_ATTENTION_IMPLEMENTATION says.
        h = attention(q, k, v, implementation="sdpa")
        h = h[:, :, 0].transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero padding on the right and bottom only, as the reference."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnet ``block``s, then an optional ``downsample`` or ``upsample``."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, resample: str | None) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels) for j in range(blocks)
        )
        if resample == "down":
            self.downsample = Downsample(out_channels)
        elif resample == "up":
            self.upsample = Upsample(out_channels)
        self.resample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        if self.resample == "down":
            x = self.downsample(x)
        elif self.resample == "up":
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    """``block_1``, ``attn_1``, ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Images ``(B, in_channels, H, W)`` to Gaussian moments ``(B, 2 * z_channels, H / f, W / f)`` (mean first)."""

    def __init__(self, config: FluxVAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in (1, *config.ch_mult)]
        last = len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(widths[i], widths[i + 1], config.num_res_blocks, "down" if i < last else None)
            for i in range(len(config.ch_mult))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latents ``(B, z_channels, h, w)`` (unscaled) to images ``(B, out_ch, h * f, w * f)``.

    ``up[i]`` is resolution level ``i`` as in the encoder, so ``up[-1]`` (the widest) runs first.
    """

    def __init__(self, config: FluxVAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        inputs = [*widths[1:], widths[-1]]  # level i reads the output of level i + 1
        self.up = nn.ModuleList(
            Level(inputs[i], widths[i], config.num_res_blocks + 1, "up" if i > 0 else None) for i in range(len(widths))
        )
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class FluxVAE(nn.Module):
    """The FLUX.1 autoencoder: ``encode`` images in [-1, 1] to DiT latents, ``decode`` them back.

    Latents are ``scale_factor * (z - shift_factor)`` of the encoder's Gaussian, as the reference returns
    them and the DiT expects them. Inputs must have the dtype and device of the weights. Satisfies the
    ``ds_models_core.VAE`` protocol (``spatial_compression``, ``temporal_compression`` 1, ``latent_channels``).
    """

    temporal_compression = 1  # an image VAE
    default_tile_size = 64  # latents per tile side when ``tiled`` is asked for without a size (512 pixels)

    def __init__(self, config: FluxVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along each side (8; ``config.downscale``)."""
        return self.config.downscale

    @property
    def latent_channels(self) -> int:
        """Channels of the latents (16; ``config.z_channels``)."""
        return self.config.z_channels

    def encode(
        self,
        images: torch.Tensor,
        tiled: bool = False,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> torch.Tensor:
        """``(B, 3, H, W)`` images in [-1, 1] to latents ``(B, z_channels, H / 8, W / 8)``.

        Args:
            tiled: encode in overlapping tiles (``tile_size`` latents per side, 64 when not given). Giving
                ``tile_size`` tiles too. H and W must then be multiples of 8.
            sample: draw ``mean + std * noise`` from the encoder's Gaussian instead of taking its mean (the
                reference default is the mean). The noise is float32 on the generator's device.
            generator: the random source of ``sample``.
            tile_size: latents per tile side (``8 * tile_size`` pixels).
            tile_overlap: latents shared by neighbouring tiles (at least), blended linearly; None: a quarter of
                ``tile_size``. On a smooth image, tiled stays within 10% of the output's standard deviation
                of untiled (tests/models/flux/test_vae.py, tiny random VAE).
        """
        moments = self._maybe_tiled(self.encoder, images, tiled, tile_size, tile_overlap, encode=True)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            device = generator.device if generator is not None else mean.device
            noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
            z = mean + torch.exp(0.5 * logvar) * noise.to(mean)
        return self.config.scale_factor * (z - self.config.shift_factor)

    def decode(
        self,
        latents: torch.Tensor,
        tiled: bool = False,
        *,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
    ) -> torch.Tensor:
        """Latents ``(B, z_channels, h, w)`` (as from ``encode``) to images ``(B, 3, 8h, 8w)``, roughly in [-1, 1].

        ``tiled``, ``tile_size`` and ``tile_overlap`` (in latents) are as in ``encode``.
        """
        z = latents / self.config.scale_factor + self.config.shift_factor
        return self._maybe_tiled(self.decoder, z, tiled, tile_size, tile_overlap, encode=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``decode(encode(images))``."""
        return self.decode(self.encode(images))

    def _maybe_tiled(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        tiled: bool,
        tile_size: int | None,
        tile_overlap: int | None,
        encode: bool,
    ) -> torch.Tensor:
        if not tiled and tile_size is None:
            return fn(x)
        if tile_size is None:
            tile_size = self.default_tile_size
        if tile_overlap is None:
            tile_overlap = tile_size // 4
        if not isinstance(tile_size, int) or tile_size <= 0 or not 0 <= tile_overlap < tile_size:
            raise ValueError(
                f"tile_size={tile_size!r} must be a positive number of latents and tile_overlap={tile_overlap!r} "
                "must be >= 0 and smaller than tile_size"
            )
        f = self.spatial_compression
        if encode and (x.shape[-2] % f or x.shape[-1] % f):
            raise ValueError(
                f"tiled encode needs height and width divisible by {f}, got {tuple(x.shape[-2:])}; "
                "crop or resize the image"
            )
        stride = tile_size - tile_overlap
        return run_tiled(fn, x, tile_size, stride, in_scale=f if encode else 1, out_scale=1 if encode else f)
