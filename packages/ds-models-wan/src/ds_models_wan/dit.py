"""The Wan 2.1 / 2.2 diffusion transformer, with the parameter names of the official Wan-AI release.

``WanDiT(WanDiTConfig.preset("wan2.1-t2v-14b"))`` has exactly the keys and shapes of the official
``diffusion_pytorch_model*.safetensors`` (``blocks.N.self_attn.q``, ``cross_attn.k_img``, ``head.modulation``...),
so those files load with ``load_state_dict(strict=True)`` and no conversion. The math follows ``WanModel`` in
Wan-Video/Wan2.1 and Wan2.2 ``wan/modules/model.py``: patchify with a Conv3d, embed the 0..1000 timestep and the
text, run the blocks (self-attention with 3D RoPE, cross-attention to text and CLIP image tokens, feed-forward, all
modulated by the timestep), project out and unpatchify.

Precision follows the reference's autocast regions: the timestep embedding, the adaLN modulation and the residual
stream are float32 whatever the weight dtype; each Linear runs in its weight dtype (under ds-vram the weights are
placeholders that still report the computation dtype); RoPE rotates in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ds_models_core import (
    RMSNorm,
    apply_rope_complex,
    attention,
    gated_residual,
    grid_positions,
    modulate,
    rope_complex,
    timestep_embedding,
    unpatchify,
)

__all__ = ["MODEL_TYPES", "WanDiT", "WanDiTConfig", "wan_rope_axes"]

MODEL_TYPES = ("t2v", "i2v", "flf2v", "ti2v")
ROPE_THETA = 10_000.0
IMG_EMB_EPS = 1e-5  # img_emb's LayerNorms are torch defaults in the reference, not the model's eps


def wan_rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Channels of each head given to (frame, height, width) RoPE: ``(d - 4*(d//6), 2*(d//6), 2*(d//6))``,
    as the reference splits them (44, 42, 42 for the released 128-wide heads)."""
    third = 2 * (head_dim // 6)
    return (head_dim - 2 * third, third, third)


@dataclass(frozen=True)
class WanDiTConfig:
    """Sizes of a Wan DiT; field names are those of the official ``WanModel`` (and its ``config.json``).

    ``has_image_input``: the model reads CLIP image tokens through ``img_emb`` and ``cross_attn.k_img/v_img``
    (2.1 I2V and FLF2V; not 2.2 I2V-A14B, which conditions through the latent channels only).
    ``has_image_position_embedding``: FLF2V's ``img_emb.emb_pos``, a learned position for each of the
    ``2 * clip_tokens`` tokens of the first and last frame. ``clip_dim`` / ``clip_tokens`` are the CLIP ViT-H/14
    width and token count (1280, 257); only tiny test configs change them. ``clip_tokens`` only sizes ``emb_pos``:
    models without it take any number of CLIP tokens.

    Use ``WanDiTConfig.preset(name)`` (names in ``PRESETS``) and ``dataclasses.replace`` for variations.
    """

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 2048
    ffn_dim: int = 8192
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 16
    num_layers: int = 32
    window_size: tuple[int, int] = (-1, -1)
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    has_image_input: bool = False
    has_image_position_embedding: bool = False
    clip_dim: int = 1280
    clip_tokens: int = 257

    PRESETS: ClassVar[tuple[str, ...]] = (
        "wan2.1-t2v-1.3b",
        "wan2.1-t2v-14b",
        "wan2.1-i2v-14b",
        "wan2.1-flf2v-14b",
        "wan2.2-t2v-a14b",
        "wan2.2-i2v-a14b",
        "wan2.2-ti2v-5b",
        "tiny",
        "tiny-i2v",
        "tiny-flf2v",
        "tiny-ti2v",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(self.patch_size))
        object.__setattr__(self, "window_size", tuple(self.window_size))
        for name in ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim", "out_dim", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"WanDiTConfig.{name}={value!r} must be a positive integer")
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ValueError(f"WanDiTConfig.num_layers={self.num_layers!r} must be an integer >= 0")
        if len(self.patch_size) != 3 or any(not isinstance(p, int) or p <= 0 for p in self.patch_size):
            raise ValueError(
                f"WanDiTConfig.patch_size={self.patch_size} must be 3 positive integers (released: 1, 2, 2)"
            )
        if self.freq_dim % 2:
            raise ValueError(f"WanDiTConfig.freq_dim={self.freq_dim} must be even (sin and cos halves; released: 256)")
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise ValueError(
                f"WanDiTConfig.dim={self.dim} must be num_heads={self.num_heads} times an even head dimension "
                "(released: 128-wide heads)"
            )
        if min(wan_rope_axes(self.head_dim)) <= 0:
            raise ValueError(f"WanDiTConfig: head dimension {self.head_dim} is too small for 3D RoPE; use at least 6")
        self._check_variant()

    def _check_variant(self) -> None:
        """The model type, the image inputs and attention window agree with each other and a release."""
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"WanDiTConfig.model_type={self.model_type!r} must be one of {', '.join(MODEL_TYPES)}")
        if self.window_size != (-1, -1):
            raise ValueError(
                f"WanDiTConfig.window_size={self.window_size}: only global attention (-1, -1) is implemented, "
                "which every release uses"
            )
        if self.has_image_position_embedding and not self.has_image_input:
            raise ValueError("WanDiTConfig: has_image_position_embedding (FLF2V) needs has_image_input=True")
        if (self.model_type == "flf2v") != self.has_image_position_embedding:
            raise ValueError(
                f"WanDiTConfig: model_type={self.model_type!r} with has_image_position_embedding="
                f"{self.has_image_position_embedding}; FLF2V models (and only they) have img_emb.emb_pos"
            )
        if self.has_image_input and self.model_type not in ("i2v", "flf2v"):
            raise ValueError(
                f"WanDiTConfig: has_image_input=True needs model_type 'i2v' or 'flf2v', not {self.model_type!r}"
            )
        if self.clip_dim <= 0 or self.clip_tokens <= 0:
            raise ValueError(
                f"WanDiTConfig: clip_dim={self.clip_dim} and clip_tokens={self.clip_tokens} must be positive"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def condition_dim(self) -> int:
        """Channels of the ``condition`` (official ``y``) forward expects: ``in_dim - out_dim`` (20 for I2V:
        4 mask + 16 latent channels; 0 for T2V and TI2V)."""
        return max(self.in_dim - self.out_dim, 0)

    @classmethod
    def preset(cls, name: str) -> WanDiTConfig:
        """A released (or tiny test) config by name, one of ``WanDiTConfig.PRESETS``.

        The A14B releases are two experts (high and low noise) of this one shape each; I2V-14B 480P and 720P share
        ``wan2.1-i2v-14b``.
        """
        key = name.strip().lower()
        if key not in _PRESETS:
            raise ValueError(f"unknown Wan DiT preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return cls(**_PRESETS[key])


_14B = {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40}
_I2V = {"model_type": "i2v", "in_dim": 36, "has_image_input": True}
_TINY = {"dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2, "text_dim": 32}
_PRESETS: dict[str, dict] = {
    "wan2.1-t2v-1.3b": {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30},
    "wan2.1-t2v-14b": _14B,
    "wan2.1-i2v-14b": {**_14B, **_I2V},
    "wan2.1-flf2v-14b": {**_14B, **_I2V, "model_type": "flf2v", "has_image_position_embedding": True},
    "wan2.2-t2v-a14b": _14B,
    "wan2.2-i2v-a14b": {**_14B, "model_type": "i2v", "in_dim": 36},
    "wan2.2-ti2v-5b": {
        "model_type": "ti2v",
        "dim": 3072,
        "ffn_dim": 14336,
        "num_heads": 24,
        "num_layers": 30,
        "in_dim": 48,
        "out_dim": 48,
    },
    # The architectures at test size: 2 heads of 16 (RoPE 8/4/4), 2 blocks, 32-wide text and CLIP features
    # (5 CLIP tokens: the tiny ViT's class token and 2 x 2 patches).
    "tiny": _TINY,
    "tiny-i2v": {**_TINY, **_I2V, "clip_dim": 32},
    "tiny-flf2v": {
        **_TINY,
        **_I2V,
        "model_type": "flf2v",
        "has_image_position_embedding": True,
        "clip_dim": 32,
        "clip_tokens": 5,
    },
    "tiny-ti2v": {**_TINY, "model_type": "ti2v", "in_dim": 48, "out_dim": 48},
}


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and returned in the input dtype (``norm3``, ``img_emb`` norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def _layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The parameter-free LayerNorms before each modulation (``norm1``, ``norm2``, ``head.norm``), in float32."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


class SelfAttention(nn.Module):
    """``q, k, v, o`` with biases, RMS norm of q and k over the full width (``norm_q``, ``norm_k``), 3D RoPE."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        x = x.to(self.q.weight.dtype)
        q = apply_rope_complex(self._heads(self.norm_q(self.q(x))), freqs)
        k = apply_rope_complex(self._heads(self.norm_k(self.k(x))), freqs)
        return self.o(attention(q, k, self._heads(self.v(x))).flatten(2))


class CrossAttention(SelfAttention):
    """Attention from the video tokens to the text tokens and, for image models, separately to the CLIP tokens
    (``k_img``, ``v_img``, ``norm_k_img``); the two results are summed before ``o``."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, image_input: bool) -> None:
        super().__init__(dim, num_heads, qk_norm, eps)
        if image_input:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_img: torch.Tensor | None) -> torch.Tensor:
        dtype = self.q.weight.dtype
        x, context = x.to(dtype), context.to(dtype)
        q = self._heads(self.norm_q(self.q(x)))
        out = attention(q, self._heads(self.norm_k(self.k(context))), self._heads(self.v(context)))
        if context_img is not None:
            context_img = context_img.to(dtype)
            k_img = self._heads(self.norm_k_img(self.k_img(context_img)))
            out = out + attention(q, k_img, self._heads(self.v_img(context_img)))
        return self.o(out.flatten(2))


class WanAttentionBlock(nn.Module):
    """Modulated self-attention, un-modulated cross-attention (behind the affine ``norm3``), modulated FFN.

    ``modulation`` (1, 6, dim) plus the projected timestep gives shift/scale/gate for attention, then for the FFN.
    """

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        dim, eps = config.dim, config.eps
        self.eps = eps
        self.self_attn = SelfAttention(dim, config.num_heads, config.qk_norm, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True) if config.cross_attn_norm else nn.Identity()
        self.cross_attn = CrossAttention(dim, config.num_heads, config.qk_norm, eps, config.has_image_input)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(config.ffn_dim, dim)
        )
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        context: torch.Tensor,
        context_img: torch.Tensor | None,
        freqs: torch.Tensor,
    ) -> torch.Tensor:
        """x: (B, L, dim) float32; e0: (B, 1 or L, 6, dim) float32; context: (B, text_len, dim)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float()[None] + e0).unbind(2)
        y = self.self_attn(modulate(_layer_norm(x, self.eps), shift1, scale1), freqs)
        x = gated_residual(x, y.float(), gate1)
        x = x + self.cross_attn(self.norm3(x), context, context_img).float()
        ffn_in = modulate(_layer_norm(x, self.eps), shift2, scale2).to(self.ffn[0].weight.dtype)
        return gated_residual(x, self.ffn(ffn_in).float(), gate2)


class Head(nn.Module):
    """Modulated LayerNorm (``modulation`` (1, 2, dim): shift, scale) and ``head``, to ``prod(patch) * out_dim``."""

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        self.eps = config.eps
        self.head = nn.Linear(config.dim, math.prod(config.patch_size) * config.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, config.dim) / config.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float()[None] + e[:, :, None]).unbind(2)
        return self.head(modulate(_layer_norm(x, self.eps), shift, scale).to(self.head.weight.dtype))


class MLPProj(nn.Module):
    """``img_emb``: CLIP tokens to the model width (LayerNorm, Linear, GELU, Linear, LayerNorm); FLF2V adds a
    learned ``emb_pos`` to the first-frame and last-frame tokens, concatenated."""

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        c = config.clip_dim
        self.proj = nn.Sequential(
            WanLayerNorm(c, IMG_EMB_EPS),
            nn.Linear(c, c),
            nn.GELU(),
            nn.Linear(c, config.dim),
            WanLayerNorm(config.dim, IMG_EMB_EPS),
        )
        if config.has_image_position_embedding:
            self.emb_pos = nn.Parameter(torch.zeros(1, 2 * config.clip_tokens, c))

    def forward(self, clip_feature: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "emb_pos"):
            clip_feature = clip_feature + self.emb_pos.to(clip_feature.dtype)
        return self.proj(clip_feature.to(self.proj[1].weight.dtype))


class WanDiT(nn.Module):
    """The Wan DiT (2.1 T2V/I2V/FLF2V, 2.2 T2V/I2V A14B experts, 2.2 TI2V-5B), parameter names as in Wan-AI's files.

    Build a released size without allocating memory with ``with torch.device("meta"): WanDiT(config)`` and load the
    checkpoint with ``load_state_dict(state_dict, assign=True)`` (or ``ds_loader.load_model``).
    """

    # Layers ds-vram keeps in the computation dtype when the rest is stored in FP8: the embedders read raw inputs
    # (latents, umT5 features with outliers, 1000-scaled timestep sinusoids, CLIP tokens) and feed every block,
    # and the head writes the velocity itself; the reference even runs the time MLPs and the head in float32.
    # Together they are under 1% of the parameters.
    ds_vram_never_fp8: ClassVar[tuple[str, ...]] = (
        "patch_embedding",
        "text_embedding.*",
        "time_embedding.*",
        "time_projection.*",
        "img_emb.*",
        "head.*",
    )

    def __init__(self, config: WanDiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        if config.has_image_input:
            self.img_emb = MLPProj(config)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        clip_feature: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        Args:
            latents: ``(B, out_dim, F, H, W)`` noisy latents (F, H, W divisible by ``patch_size``).
            timestep: ``(B,)`` timesteps on the reference's 0..1000 scale (sigma * 1000), or ``(B, L)`` one per
                token, ``L = F*H*W / prod(patch_size)`` in (frame, row, column) order: TI2V-5B gives the pinned
                first-frame tokens 0.
            context: ``(B, S, text_dim)`` umT5 features with padding positions zeroed; shorter than ``text_len``
                (512) they are zero-padded to it, as the reference does (the padded tokens take part in attention).
            clip_feature: CLIP ViT tokens for image models (``has_image_input``): ``(B, clip_tokens, clip_dim)``;
                FLF2V: ``(B, 2 * clip_tokens, clip_dim)``, the first frame's tokens then the last frame's (the
                reference's ``(2B, clip_tokens, clip_dim)`` pairs are accepted too).
            condition: the reference's ``y``, concatenated to ``latents`` on channels: ``(B, in_dim - out_dim, F, H,
                W)`` for I2V/FLF2V (4 mask channels + 16 latent channels), None for T2V and TI2V.

        Returns:
            ``(B, out_dim, F, H, W)`` in the dtype of ``latents``.
        """
        self._check_inputs(latents, timestep, context, condition)
        clip_feature = self._clip_tokens(clip_feature, latents.shape[0])
        x = latents if condition is None else torch.cat((latents, condition.to(latents.dtype)), dim=1)
        config = self.config
        dtype = self.patch_embedding.weight.dtype
        size = tuple(x.shape[2:])
        grid = tuple(s // p for s, p in zip(size, config.patch_size, strict=True))

        x = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).float()
        positions = grid_positions(grid, device=x.device)
        freqs = rope_complex(positions, wan_rope_axes(config.head_dim), ROPE_THETA, dtype=torch.complex128)

        t = timestep if timestep.ndim == 2 else timestep[:, None]  # (B, 1 or L)
        sinusoid = timestep_embedding(t, config.freq_dim, dtype=torch.float64)
        e = self.time_embedding(sinusoid.to(dtype)).float()
        e0 = self.time_projection(e.to(dtype)).float().unflatten(-1, (6, config.dim))

        if context.shape[1] < config.text_len:
            context = F.pad(context, (0, 0, 0, config.text_len - context.shape[1]))
        context = self.text_embedding(context.to(dtype))
        context_img = self.img_emb(clip_feature) if clip_feature is not None else None

        for block in self.blocks:
            x = block(x, e0, context, context_img, freqs)
        x = self.head(x, e)
        return unpatchify(x, size, config.patch_size, channels_last=True).to(latents.dtype)

    def _check_inputs(
        self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, condition: torch.Tensor | None
    ) -> None:
        """Shapes of the forward arguments, checked up front so a mistake names the argument."""
        c = self.config
        if latents.ndim != 5 or (condition is not None and condition.shape[2:] != latents.shape[2:]):
            cond = "" if condition is None else f" and condition {tuple(condition.shape)}"
            raise ValueError(f"WanDiT: latents {tuple(latents.shape)}{cond} must be (B, C, F, H, W) of one size")
        b, size = latents.shape[0], tuple(latents.shape[2:])
        channels = latents.shape[1] + (0 if condition is None else condition.shape[1])
        if channels != c.in_dim:
            given = f"latents {latents.shape[1]}" + (" (no condition)" if condition is None else "")
            given += "" if condition is None else f" + condition {condition.shape[1]}"
            hint = f"; pass condition with {c.condition_dim} channels (the I2V y)" if c.condition_dim else ""
            raise ValueError(f"WanDiT: the model takes {c.in_dim} input channels, got {given}{hint}")
        if any(s % p for s, p in zip(size, c.patch_size, strict=True)):
            raise ValueError(f"WanDiT: latent size {size} is not divisible by patch_size {c.patch_size}")
        tokens = math.prod(size) // math.prod(c.patch_size)
        if tuple(timestep.shape) not in ((b,), (b, tokens)):
            raise ValueError(
                f"WanDiT: timestep has shape {tuple(timestep.shape)}, expected ({b},) or ({b}, {tokens}) (per token)"
            )
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.text_dim:
            raise ValueError(f"WanDiT: context has shape {tuple(context.shape)}, expected ({b}, S, {c.text_dim})")
        if context.shape[1] > c.text_len:
            raise ValueError(f"WanDiT: context has {context.shape[1]} tokens, more than text_len={c.text_len}")

    def _clip_tokens(self, clip_feature: torch.Tensor | None, b: int) -> torch.Tensor | None:
        """The CLIP features checked and in the ``(B, N, clip_dim)`` layout (FLF2V: N = 2 * clip_tokens)."""
        c = self.config
        if not c.has_image_input:
            if clip_feature is not None:
                raise ValueError("WanDiT: this model has no image input (img_emb); pass clip_feature=None")
            return None
        if clip_feature is None:
            raise ValueError(f"WanDiT: this {c.model_type} model needs clip_feature, CLIP tokens (B, N, {c.clip_dim})")
        n = 2 * c.clip_tokens if c.has_image_position_embedding else None
        if n is not None and tuple(clip_feature.shape) == (2 * b, c.clip_tokens, c.clip_dim):
            clip_feature = clip_feature.reshape(b, n, c.clip_dim)  # the reference's (first, last) pairs
        shape = tuple(clip_feature.shape)
        if len(shape) != 3 or shape[0] != b or shape[2] != c.clip_dim or (n is not None and shape[1] != n):
            expected = f"({b}, {n if n is not None else 'N'}, {c.clip_dim})"
            raise ValueError(f"WanDiT: clip_feature has shape {shape}, expected {expected}")
        return clip_feature
