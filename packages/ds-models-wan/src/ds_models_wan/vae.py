"""The Wan 2.1 video VAE (z 16, 8x spatial, 4x temporal, causal), with the parameter names of ``Wan2.1_VAE.pth``.

The math follows Wan-Video/Wan2.1 ``wan/modules/vae.py``: 3D causal convolutions (padded only towards the past in
time), RMS norms with a learned ``gamma``, per-frame single-head attention in the middle blocks. Time is compressed
4x with a causal first frame, so a video of ``4k + 1`` frames has ``k + 1`` latent frames.

Streaming: encode runs the first frame, then chunks of 4 frames; decode runs one latent frame at a time. Each causal
convolution keeps the last ``CACHE_T`` (2) frames of its input between chunks (``StreamCache``), so memory does not
grow with the frame count. The Wan 2.2 VAE (``vae22.py``) reuses these blocks.

Spatial tiling (``tiled=True``) splits the latent grid into overlapping tiles, runs each tile through the whole
streamed encode or decode, and blends the overlaps with linear ramps (``ds_models_core.tiling``). Tiles see no
context beyond their border, so tiled output differs slightly from untiled output near seams (bounds in
tests/models/wan/test_vae.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ds_models_core import attention
from ds_models_core.tiling import run_tiled

__all__ = [
    "WAN21_LATENTS_MEAN",
    "WAN21_LATENTS_STD",
    "StreamCache",
    "WanVAE",
    "WanVAEConfig",
]

CACHE_T = 2  # frames of past input each causal 3x3x3 convolution keeps between chunks

# Per-channel statistics of the 2.1 latents (the official WanVAE wrapper); encode returns (mu - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

StreamCache = dict[nn.Module, "torch.Tensor | None"]
"""Per-layer state of one streamed pass (one video, one tile): a layer's past input frames, or None for "seen"."""


@dataclass(frozen=True)
class WanVAEConfig:
    """Sizes of the Wan 2.1 VAE; names as in the official ``WanVAE_`` constructor."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # one resolution level each; all but the last halve H and W
    num_res_blocks: int = 2  # per encoder level; the decoder has one more per level
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # per level but the last: also halve time
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    PRESETS: ClassVar[tuple[str, ...]] = ("wan2.1", "tiny")

    def __post_init__(self) -> None:
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        _check_sizes(self, ("dim", "z_dim", "num_res_blocks"))
        if not self.dim_mult or any(not isinstance(m, int) or m <= 0 for m in self.dim_mult):
            raise ValueError(f"WanVAEConfig.dim_mult={self.dim_mult!r} must be a non-empty tuple of positive integers")
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig.temperal_downsample={self.temperal_downsample!r} needs one flag per downsampling "
                f"level ({len(self.dim_mult) - 1} for dim_mult={self.dim_mult!r})"
            )
        if sum(self.temperal_downsample) != 2:
            raise ValueError(
                f"WanVAEConfig.temperal_downsample={self.temperal_downsample!r}: exactly two levels must halve time "
                "(the 4x temporal compression the chunked encode and decode rely on)"
            )
        if any((self.dim * m) % 2 for m in self.dim_mult):
            raise ValueError("WanVAEConfig: dim * dim_mult must be even (the decoder upsamplers halve widths)")
        _check_stats(self)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def wan21(cls) -> WanVAEConfig:
        """The released ``Wan2.1_VAE.pth`` (about 127 M parameters); also the VAE of the 2.2 A14B models."""
        return cls()

    @classmethod
    def tiny(cls) -> WanVAEConfig:
        """The same architecture at test size: widths 16/32/64/64 (two residual blocks per level and z 16 as
        released, so diffusers' single-file converter applies to it too)."""
        return cls(dim=16)

    @classmethod
    def preset(cls, name: str) -> WanVAEConfig:
        """The config of a preset by name (one of ``WanVAEConfig.PRESETS``)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown Wan 2.1 VAE preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls.wan21() if name == "wan2.1" else cls.tiny()


def _check_sizes(config: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name}={value!r} must be a positive integer")


def _check_stats(config: object) -> None:
    z_dim = config.z_dim  # type: ignore[attr-defined]
    for name in ("latents_mean", "latents_std"):
        values = getattr(config, name)
        if len(values) != z_dim:
            raise ValueError(f"{type(config).__name__}.{name} has {len(values)} values; z_dim={z_dim} needs one each")
    if any(not s > 0 for s in config.latents_std):  # type: ignore[attr-defined]
        raise ValueError(f"{type(config).__name__}.latents_std must be positive")


# --- building blocks (shared with vae22.py) --------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """A 3D convolution padded ``2 * padding[0]`` frames into the past only, streamable through a ``StreamCache``.

    With a cache, the past frames are the last ``CACHE_T`` input frames of the previous chunks (zeros before the
    first), so a video run chunk by chunk gives what one pass over the whole video would.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        t, h, w = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad = 2 * t
        self.space_pad = (w, w, h, h)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:  # type: ignore[override]
        pad_time = self.time_pad
        if cache is not None and pad_time:
            past = cache.get(self)
            joined = x if past is None else torch.cat([past, x], dim=2)
            cache[self] = joined[:, :, -CACHE_T:].clone()  # a copy: a view would keep the whole chunk alive
            pad_time -= joined.shape[2] - x.shape[2]
            x = joined
        return super().forward(F.pad(x, (*self.space_pad, pad_time, 0)))


class RMSNorm(nn.Module):
    """``x / ||x||_2 * sqrt(C) * gamma`` over channels (dim 1); ``gamma`` has shape (C, 1, 1[, 1]) as officially."""

    def __init__(self, dim: int, video: bool = True) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1) if video else torch.ones(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 for half-precision inputs: the sum of squares over 1024 channels overflows fp16.
        low = x.dtype in (torch.float16, torch.bfloat16)
        normed = F.normalize(x.float() if low else x, dim=1).to(x.dtype)
        return normed * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """(RMSNorm, SiLU, causal 3x3x3 conv) twice plus a shortcut (1x1x1 conv when the width changes).

    ``residual`` keeps the official ``nn.Sequential`` indices (0 norm, 2 conv, 3 norm, 6 conv; the others are
    parameter-free activations and dropout) so the checkpoint keys match.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # dropout 0 in every release
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        r = self.residual
        h = r[2](F.silu(r[0](x)), cache)
        h = r[6](F.silu(r[3](h)), cache)
        return self.shortcut(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately (``norm``, ``to_qkv``, ``proj``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, video=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        q, k, v = self.to_qkv(self.norm(frames)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        # One head as wide as the block (up to 1024): no FlashAttention/Sage kernel takes it, so stay on SDPA.
        out = attention(q[:, :, None], k[:, :, None], v[:, :, None], implementation="sdpa")[:, :, 0]
        out = self.proj(out.transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """Per-frame 2x spatial down/upsampling, and for the ``*3d`` modes 2x in time through ``time_conv``.

    ``resample.1`` is the 2D convolution (index 0 is the parameter-free pad or nearest-exact upsampling). Time is
    only resampled when streaming: downsampling keeps the first chunk's frame and then merges the previous chunk's
    last frame with the new ones (stride 2); upsampling leaves the first latent frame alone and doubles every later
    one (``time_conv`` gives two frames' channels, interleaved in time).
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            conv = nn.Conv2d(dim, out_dim if out_dim is not None else dim // 2, 3, padding=1)
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"), conv)
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("down"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"Resample mode {mode!r} must be upsample2d, upsample3d, downsample2d or downsample3d")

    def forward(self, x: torch.Tensor, cache: StreamCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            if self not in cache:
                cache[self] = None  # the first latent frame decodes to one frame
            else:
                b, c, t, h, w = x.shape
                x = self.time_conv(x, cache).reshape(b, 2, c, t, h, w)
                x = x.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        if self.mode.startswith("up"):
            # nearest-exact in float32: the upsampling kernels lack bfloat16 on some devices
            frames = self.resample[1](self.resample[0](frames.float()).to(x.dtype))
        else:
            frames = self.resample(frames)
        x = frames.reshape(b, t, *frames.shape[1:]).transpose(1, 2)
        if self.mode == "downsample3d" and cache is not None:
            past = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if past is not None:
                x = self.time_conv(torch.cat([past, x], dim=2))
        return x


def run_layers(layers: nn.Module, x: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
    """Apply each layer of a sequence in order, passing the cache."""
    for layer in layers:
        x = layer(x, cache)
    return x


def middle_blocks(dim: int) -> nn.Sequential:
    """``middle``: residual block, attention, residual block."""
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def head_layers(in_dim: int, out_dim: int) -> nn.Sequential:
    """``head``: RMSNorm (index 0), SiLU, causal 3x3x3 conv (index 2)."""
    return nn.Sequential(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


def run_head(head: nn.Sequential, x: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
    return head[2](F.silu(head[0](x)), cache)


# --- the 2.1 encoder and decoder ----------------------------------------------------------------------------------


class Encoder3d(nn.Module):
    """Pixels (B, 3, T, H, W) of one chunk to Gaussian moments (B, 2 z, T', H / 8, W / 8); ``downsamples`` is flat."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i in range(len(config.dim_mult)):
            for j in range(config.num_res_blocks):
                layers.append(ResidualBlock(dims[i] if j == 0 else dims[i + 1], dims[i + 1]))
            if i < len(config.dim_mult) - 1:
                layers.append(
                    Resample(dims[i + 1], "downsample3d" if config.temperal_downsample[i] else "downsample2d")
                )
        self.downsamples = nn.Sequential(*layers)
        self.middle = middle_blocks(dims[-1])
        self.head = head_layers(dims[-1], 2 * config.z_dim)

    def forward(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        x = run_layers(self.downsamples, self.conv1(x, cache), cache)
        return run_head(self.head, run_layers(self.middle, x, cache), cache)


class Decoder3d(nn.Module):
    """Latents (B, z, 1, h, w) of one latent frame to pixels (B, 3, 1 or 4, 8h, 8w); ``upsamples`` is flat."""

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        mult = config.dim_mult
        dims = [config.dim * m for m in (mult[-1], *reversed(mult))]
        temperal_upsample = tuple(reversed(config.temperal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        self.middle = middle_blocks(dims[0])
        layers: list[nn.Module] = []
        for i in range(len(mult)):
            in_dim = dims[i] // 2 if i > 0 else dims[i]  # the previous upsampler halved the width
            for j in range(config.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim if j == 0 else dims[i + 1], dims[i + 1]))
            if i < len(mult) - 1:
                layers.append(Resample(dims[i + 1], "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = head_layers(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: StreamCache, first: bool = False) -> torch.Tensor:
        x = run_layers(self.middle, self.conv1(x, cache), cache)
        return run_head(self.head, run_layers(self.upsamples, x, cache), cache)


# --- streaming, tiling and the public model -------------------------------------------------------------------


def nearest_frame_counts(frames: int) -> str:
    below = (frames - 1) // 4 * 4 + 1
    return f"{below} or {below + 4}" if below >= 1 else "1 or 5"


class WanVideoVAEBase(nn.Module):
    """Streaming, tiling and latent normalisation shared by ``WanVAE`` and ``WanVAE22``.

    Subclasses set ``encoder``, ``conv1`` (moments), ``conv2`` (latents), ``decoder``, ``z_dim``,
    ``spatial_compression``, ``patch_size`` and ``config`` (with ``latents_mean``/``latents_std``). Satisfies the
    ``ds_models_core.VAE`` protocol (``latent_channels`` is ``z_dim``).
    """

    temporal_compression = 4
    patch_size = 1

    @property
    def latent_channels(self) -> int:
        """Channels of the latents (``z_dim``: 16 for 2.1, 48 for 2.2)."""
        return self.z_dim

    @property
    def latents_mean(self) -> torch.Tensor:
        """Per-channel mean of the raw latents, float32 on the CPU (a copy; not part of the state dict)."""
        return torch.tensor(self.config.latents_mean, dtype=torch.float32)

    @property
    def latents_std(self) -> torch.Tensor:
        """Per-channel standard deviation of the raw latents, float32 on the CPU."""
        return torch.tensor(self.config.latents_std, dtype=torch.float32)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        return (self.latents_mean.to(like).view(shape), self.latents_std.to(like).view(shape))

    def encode(
        self,
        video: torch.Tensor,
        tiled: bool = False,
        tile_size: tuple[int, int] = (30, 52),
        tile_stride: tuple[int, int] = (15, 26),
    ) -> torch.Tensor:
        """Video (B, 3, F, H, W) in [-1, 1] to normalised latents (B, z_dim, (F - 1) / 4 + 1, H / s, W / s).

        The latents are the encoder's Gaussian mean, then ``(mu - latents_mean) / latents_std`` as the official
        wrapper returns them and the DiT expects them. F must be 4k + 1 and H, W multiples of
        ``spatial_compression`` (s: 8 for 2.1, 16 for 2.2). The input must have the weights' dtype and device.

        tiled: encode overlapping spatial tiles one at a time (bounded memory at high resolution).
        tile_size, tile_stride: (height, width) of a tile and the step between tiles, in LATENT pixels (one is
            ``s`` video pixels): the default (30, 52) / (15, 26) is 240x416 / 120x208 pixels on 2.1, so tiles
            overlap by half. Tiles are blended with linear ramps over the overlap.
        """
        s = self.spatial_compression
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"encode expects a video of shape (B, 3, F, H, W), got {tuple(video.shape)}")
        frames, height, width = video.shape[2:]
        if frames % 4 != 1:
            raise ValueError(
                f"encode needs 4k + 1 frames (the first frame is encoded alone, then groups of 4); got {frames}, "
                f"the nearest valid counts are {nearest_frame_counts(frames)}"
            )
        if height % s or width % s:
            raise ValueError(f"encode needs height and width divisible by {s}, got {height}x{width}")
        if tiled:
            mu = run_tiled(self._encode_stream, video, tile_size, tile_stride, in_scale=s, out_scale=1)
        else:
            mu = self._encode_stream(video)
        mean, std = self._stats(mu)
        return (mu - mean) / std

    def decode(
        self,
        latents: torch.Tensor,
        tiled: bool = False,
        tile_size: tuple[int, int] = (30, 52),
        tile_stride: tuple[int, int] = (15, 26),
    ) -> torch.Tensor:
        """Normalised latents (B, z_dim, T, h, w) (as from ``encode``) to a video (B, 3, 4(T - 1) + 1, sh, sw).

        The output is clamped to [-1, 1]. ``tile_size``/``tile_stride`` are in latent pixels, as in ``encode``.
        """
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"decode expects latents of shape (B, {self.z_dim}, T, h, w), got {tuple(latents.shape)}")
        mean, std = self._stats(latents)
        z = latents * std + mean
        if tiled:
            video = run_tiled(
                self._decode_stream, z, tile_size, tile_stride, in_scale=1, out_scale=self.spatial_compression
            )
        else:
            video = self._decode_stream(z)
        return video.clamp_(-1.0, 1.0)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """``decode(encode(video))``."""
        return self.decode(self.encode(video))

    def _encode_stream(self, video: torch.Tensor) -> torch.Tensor:
        """Gaussian means (unnormalised) of a whole video, encoded as frame 0, then chunks of 4 frames (each
        patchified on its own, so no full-size copy of the video is made)."""
        cache: StreamCache = {}
        chunks = [self.encoder(_patchify(video[:, :, :1], self.patch_size), cache)]
        for start in range(1, video.shape[2], 4):
            chunks.append(self.encoder(_patchify(video[:, :, start : start + 4], self.patch_size), cache))
        moments = self.conv1(torch.cat(chunks, dim=2))
        return moments[:, : self.z_dim]

    def _decode_stream(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels of unnormalised latents, decoded one latent frame at a time into a preallocated video."""
        x = self.conv2(z)
        cache: StreamCache = {}
        out = None
        at = 0
        for i in range(x.shape[2]):
            frames = _unpatchify(self.decoder(x[:, :, i : i + 1], cache, first=i == 0), self.patch_size)
            if out is None:
                total = 1 + 4 * (x.shape[2] - 1)
                out = frames.new_empty(*frames.shape[:2], total, *frames.shape[3:])
            out[:, :, at : at + frames.shape[2]] = frames
            at += frames.shape[2]
            del frames
        return out


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) to (B, C * p * p, T, H / p, W / p); channel order (c, column offset, row offset)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def _unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of ``_patchify``."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    x = x.reshape(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


class WanVAE(WanVideoVAEBase):
    """The Wan 2.1 VAE (``Wan2.1_VAE.pth``): ``encode`` videos in [-1, 1] to normalised latents, ``decode`` back.

    Parameter names are the official ones (``encoder.conv1``, ``encoder.downsamples.N``, ``conv1``, ``conv2``,
    ``decoder.upsamples.N``, ``*.head.2``...), so the official file loads with no conversion.
    """

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.z_dim = config.z_dim
        self.spatial_compression = config.spatial_compression
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
