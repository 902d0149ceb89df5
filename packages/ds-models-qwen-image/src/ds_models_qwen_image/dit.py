"""The Qwen-Image diffusion transformer, with the parameter names of the official release.

``QwenImageDiT(QwenImageDiTConfig.qwen_image())`` has exactly the keys and shapes of ``transformer/*.safetensors``
in Qwen/Qwen-Image (and -2512, -Edit, -Edit-2509, -Edit-2511), which are the names of diffusers'
``QwenImageTransformer2DModel``, so the shards load with ``load_state_dict(strict=True)`` and no conversion. The
math follows diffusers 0.42 (the reference implementation the Qwen team published):

1. the timestep ``sigma`` in [0, 1] becomes a 256-d cos-first sinusoid of ``1000 * sigma`` and, through
   ``time_text_embed.timestep_embedder`` (Linear, SiLU, Linear), the ``temb`` that modulates every block;
2. image tokens (2x2 patches of 16-channel latents, 64 values each; the target's first, then each reference
   image's) go through ``img_in``; the Qwen2.5-VL prompt features through ``txt_norm`` (RMSNorm) and ``txt_in``;
3. 60 dual-stream blocks: each stream has its own adaLN (``img_mod``/``txt_mod``: SiLU, Linear to shift, scale and
   gate for the attention and the MLP), LayerNorms without affine (eps 1e-6), q/k/v projections with per-head
   RMSNorm on q and k, and a tanh-GELU MLP; one joint attention runs over ``[text, image]``, padded text tokens
   masked out as keys;
4. ``norm_out`` (LayerNorm scaled and shifted by ``temb``, chunk order scale then shift) and ``proj_out`` give
   the prediction for every image token.

Positions (3-axis RoPE, theta 10000, 16/56/56 channels, complex rotation of adjacent pairs): image ``j`` (0 the
target, 1, 2, ... the references) has frame index ``j``, and centred rows and columns, ``-(h - h // 2) ..
h // 2 - 1``; text token ``i`` sits at ``m + i`` on all three axes, ``m`` the largest ``max(h // 2, w // 2)`` over
the images.

Edit-2511 (``zero_cond_t``): the reference images are clean, so their tokens are modulated by the embedding of
t = 0 while the target's use t (the text stream and the output norm use t).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
    patchify,
    timestep_embedding,
    unpatchify,
)

__all__ = [
    "BlockResidual",
    "QwenImageBlock",
    "QwenImageDiT",
    "QwenImageDiTConfig",
    "QwenImageTrunk",
    "check_inputs",
    "joint_attention_mask",
    "pack_latents",
    "rope_frequencies",
    "unpack_latents",
]

TIMESTEP_CHANNELS = 256  # sinusoid channels fed to time_text_embed.timestep_embedder
TIMESTEP_SCALE = 1000.0  # the model's sigma in [0, 1] is multiplied by this before the sinusoid
ROPE_THETA = 10000.0
NORM_EPS = 1e-6  # every LayerNorm and RMSNorm of the model

BlockResidual = Callable[[int, torch.Tensor], torch.Tensor | None]
"""``(block index, image-stream hidden states (B, N, dim)) -> residual or None``, called after each block; a
residual ``(B, M, dim)`` with ``M <= N`` is added to the first ``M`` image tokens (the target's, for ControlNets)."""


@dataclass(frozen=True)
class QwenImageDiTConfig:
    """Sizes of a Qwen-Image DiT; field names are diffusers' ``QwenImageTransformer2DModel`` arguments.

    Use a preset (``qwen_image()``, ``edit_2511()``, ``tiny()``, or ``preset("qwen-image-edit-2511")``) and
    ``dataclasses.replace`` for variations. Every release shares one architecture; Edit-2511 differs only in
    ``zero_cond_t``, which the weights cannot show.
    """

    patch_size: int = 2
    in_channels: int = 64  # 16 latent channels x 2 x 2
    out_channels: int = 16  # latent channels of the prediction (proj_out gives patch_size**2 times as many)
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584  # Qwen2.5-VL-7B hidden size
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)  # RoPE channels for (frame, row, column); sum = head dim
    zero_cond_t: bool = False  # Edit-2511: reference tokens modulated at t = 0

    PRESETS: ClassVar[tuple[str, ...]] = (
        "qwen-image",
        "qwen-image-2512",
        "qwen-image-edit",
        "qwen-image-edit-2509",
        "qwen-image-edit-2511",
        "tiny",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        for name in (
            "patch_size",
            "in_channels",
            "out_channels",
            "num_layers",
            "attention_head_dim",
            "num_attention_heads",
            "joint_attention_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"QwenImageDiTConfig.{name}={value!r} must be a positive integer")
        if not isinstance(self.zero_cond_t, bool):
            raise ValueError(f"QwenImageDiTConfig.zero_cond_t={self.zero_cond_t!r} must be True or False")
        axes = self.axes_dims_rope
        if len(axes) != 3 or any(not isinstance(d, int) or d <= 0 or d % 2 for d in axes):
            raise ValueError(
                f"QwenImageDiTConfig.axes_dims_rope={axes} must be three positive even numbers (frame, row, column)"
            )
        if sum(axes) != self.attention_head_dim:
            raise ValueError(
                f"QwenImageDiTConfig.axes_dims_rope={axes} sums to {sum(axes)}, not the head dimension "
                f"attention_head_dim={self.attention_head_dim} (Qwen-Image: (16, 56, 56) for 128)"
            )

    @property
    def inner_dim(self) -> int:
        """The model width: ``num_attention_heads * attention_head_dim`` (3072)."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def patch_dim(self) -> int:
        """Values per output token: ``patch_size**2 * out_channels`` (64)."""
        return self.patch_size * self.patch_size * self.out_channels

    @classmethod
    def qwen_image(cls) -> QwenImageDiTConfig:
        """Qwen-Image, -2512, -Edit and -Edit-2509: the 20.4 B dual-stream MMDiT."""
        return cls()

    @classmethod
    def edit_2511(cls) -> QwenImageDiTConfig:
        """Qwen-Image-Edit-2511: the same weights layout, reference tokens modulated at t = 0."""
        return cls(zero_cond_t=True)

    @classmethod
    def tiny(cls) -> QwenImageDiTConfig:
        """The released architecture at test size: 2 blocks, 2 heads of 32 (width 64), a 32-wide prompt (a tiny
        Qwen2.5-VL), 16-channel latents as released (the Wan 2.1 VAE's)."""
        return cls(
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(8, 12, 12),
        )

    @classmethod
    def preset(cls, name: str) -> QwenImageDiTConfig:
        """The config of a preset by name (one of ``QwenImageDiTConfig.PRESETS``; ``_`` works for ``-``)."""
        key = name.strip().lower().replace("_", "-")
        if key not in cls.PRESETS:
            raise ValueError(f"unknown Qwen-Image DiT preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        if key == "tiny":
            return cls.tiny()
        return cls.edit_2511() if key == "qwen-image-edit-2511" else cls.qwen_image()


# ---------------------------------------------------------------------------------------------- latents <-> tokens
def pack_latents(latents: torch.Tensor, patch_size: int = 2) -> torch.Tensor:
    """``(B, C, H, W)`` latents -> ``(B, H/2 * W/2, 4C)`` tokens, row-major, each token channel-major ``(c, ph, pw)``
    (diffusers' ``_pack_latents``; ``C`` may be 16, or 17 for a latent plus an inpaint-mask channel)."""
    return patchify(latents, (patch_size, patch_size))


def unpack_latents(tokens: torch.Tensor, height: int, width: int, patch_size: int = 2) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: ``(B, H/2 * W/2, 4C)`` -> ``(B, C, H, W)``; ``height``/``width`` are the
    latent's (the image's / 8)."""
    return unpatchify(tokens, (height, width), (patch_size, patch_size))


# ---------------------------------------------------------------------------------------------- embeddings
def timestep_sinusoid(timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B,)`` sigma -> ``(B, 256)`` ``[cos, sin]`` of ``1000 * sigma * f_i``, ``f_i = 10000 ** (-i / 128)``, in
    ``dtype``.

    As diffusers computes it, so bf16 runs match it too: sigma is first cast to the computation dtype (bf16 rounds
    it), the sinusoid is taken in float32.
    """
    return timestep_embedding(timestep.to(dtype), TIMESTEP_CHANNELS, scale=TIMESTEP_SCALE).to(dtype)


def _axis_angles(positions: torch.Tensor, dim: int) -> torch.Tensor:
    # float32 throughout, as the reference's tables: inverse frequencies theta ** (-2i / dim), times the position.
    inverse = 1.0 / torch.pow(ROPE_THETA, torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    return positions[:, None] * inverse


def rope_frequencies(
    image_shapes: Sequence[tuple[int, int, int]],
    text_len: int,
    axes_dims: Sequence[int],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex rotations for the image tokens ``(N, head_dim // 2)`` and the text tokens ``(text_len, ...)``.

    Image ``j`` of shape ``(frames, h, w)`` (tokens) sits at frames ``j .. j + frames - 1`` with centred rows and
    columns; text token ``i`` at ``m + i`` on every axis, ``m = max(max(h // 2, w // 2))`` over the images.
    """
    image_positions, start = [], 0
    for index, (frames, height, width) in enumerate(image_shapes):
        image_positions.append(
            grid_positions((frames, height, width), start=(index, 0, 0), centered=(False, True, True), device=device)
        )
        start = max(start, height // 2, width // 2)
    text = torch.arange(start, start + text_len, dtype=torch.float32, device=device)[:, None].expand(-1, 3)
    out = []
    for positions in (torch.cat(image_positions), text):
        angles = torch.cat([_axis_angles(positions[:, a], d) for a, d in enumerate(axes_dims)], dim=-1)
        out.append(torch.polar(torch.ones_like(angles), angles))
    return out[0], out[1]


def joint_attention_mask(prompt_mask: torch.Tensor | None, image_tokens: int) -> torch.Tensor | None:
    """The key mask ``(B, 1, 1, L + N)`` of the joint ``[text, image]`` attention: False at padded prompt tokens.

    None when every prompt token is valid, so unmasked kernels (FlashAttention) can run; the result is the same.
    """
    if prompt_mask is None or bool(prompt_mask.all()):
        return None
    image_keys = prompt_mask.new_ones(prompt_mask.shape[0], image_tokens)
    return torch.cat([prompt_mask, image_keys], dim=1)[:, None, None, :]


# ---------------------------------------------------------------------------------------------- layers
class TimestepEmbedder(nn.Module):
    """``linear_1`` (256 -> dim), SiLU, ``linear_2`` (dim -> dim)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(TIMESTEP_CHANNELS, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeTextEmbed(nn.Module):
    """``time_text_embed``: only a timestep embedder (Qwen-Image has no pooled text or guidance embedding)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep_sinusoid(timestep, dtype))


class JointAttention(nn.Module):
    """Attention over ``[text, image]`` with separate projections per stream, all with biases: image ``to_q/k/v``,
    ``to_out.0``; text ``add_q/k/v_proj``, ``to_add_out``; per-head RMSNorm ``norm_q/k`` and ``norm_added_q/k``."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.add_q_proj = nn.Linear(dim, dim)
        self.add_k_proj = nn.Linear(dim, dim)
        self.add_v_proj = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.to_add_out = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim, eps=NORM_EPS)
        self.norm_k = RMSNorm(head_dim, eps=NORM_EPS)
        self.norm_added_q = RMSNorm(head_dim, eps=NORM_EPS)
        self.norm_added_k = RMSNorm(head_dim, eps=NORM_EPS)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        image_freqs: torch.Tensor,
        text_freqs: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        heads = (self.heads, -1)
        q = apply_rope_complex(self.norm_q(self.to_q(image).unflatten(-1, heads)), image_freqs)
        k = apply_rope_complex(self.norm_k(self.to_k(image).unflatten(-1, heads)), image_freqs)
        v = self.to_v(image).unflatten(-1, heads)
        tq = apply_rope_complex(self.norm_added_q(self.add_q_proj(text).unflatten(-1, heads)), text_freqs)
        tk = apply_rope_complex(self.norm_added_k(self.add_k_proj(text).unflatten(-1, heads)), text_freqs)
        tv = self.add_v_proj(text).unflatten(-1, heads)
        out = attention(torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1), mask).flatten(2)
        length = text.shape[1]
        return self.to_out[0](out[:, length:]), self.to_add_out(out[:, :length])


class TanhGELUProjection(nn.Module):
    """``proj`` then GELU with the tanh approximation (diffusers' ``GELU(approximate="tanh")``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net.0.proj`` (dim -> 4 dim), tanh GELU, ``net.2`` (4 dim -> dim); ``net.1`` is diffusers' (empty)
    dropout slot, kept so the indices match."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([TanhGELUProjection(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, target_len: int | None) -> torch.Tensor:
    """``x * (1 + scale) + shift`` per sample; with ``target_len`` (zero_cond_t) the parameters have ``2B`` rows:
    the first ``B`` for the first ``target_len`` tokens, the last ``B`` for the rest."""
    if target_len is None:
        return modulate(x, shift[:, None], scale[:, None])
    b = x.shape[0]
    target = modulate(x[:, :target_len], shift[:b, None], scale[:b, None])
    return torch.cat([target, modulate(x[:, target_len:], shift[b:, None], scale[b:, None])], dim=1)


def _gate(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, target_len: int | None) -> torch.Tensor:
    """``x + gate * y``, the gate split like :func:`_modulate`'s parameters."""
    if target_len is None:
        return gated_residual(x, y, gate[:, None])
    b = x.shape[0]
    target = gated_residual(x[:, :target_len], y[:, :target_len], gate[:b, None])
    return torch.cat([target, gated_residual(x[:, target_len:], y[:, target_len:], gate[b:, None])], dim=1)


class QwenImageBlock(nn.Module):
    """A dual-stream block (diffusers' ``QwenImageTransformerBlock``).

    Per stream ``s`` (image, text): ``s_mod`` = SiLU, Linear(dim -> 6 dim) gives ``(shift, scale, gate)`` for the
    attention, then for the MLP; ``s_norm1``/``s_norm2`` are LayerNorms without parameters::

        image, text += gate1 * joint_attention(norm1(s) * (1 + scale1) + shift1)
        s += gate2 * s_mlp(norm2(s) * (1 + scale2) + shift2)
    """

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.attn = JointAttention(dim, heads, head_dim)
        self.img_mlp = FeedForward(dim)
        self.txt_mlp = FeedForward(dim)

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        image_freqs: torch.Tensor,
        text_freqs: torch.Tensor,
        mask: torch.Tensor | None = None,
        target_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``image``: ``(B, N, dim)``; ``text``: ``(B, L, dim)``; ``temb``: ``(B, dim)``, or ``(2B, dim)`` with
        ``target_len`` (zero_cond_t: rows ``B..2B`` are t = 0, for image tokens from ``target_len`` on; the text
        stream uses the first ``B``). ``mask``: ``(B, 1, 1, L + N)`` bool, True where a key may be attended.
        Returns the new ``(image, text)``."""
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(temb).chunk(6, dim=-1)
        text_temb = temb[: image.shape[0]] if target_len is not None else temb
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(text_temb).chunk(6, dim=-1)

        img_in = _modulate(_layer_norm(image), img_shift1, img_scale1, target_len)
        txt_in = modulate(_layer_norm(text), txt_shift1[:, None], txt_scale1[:, None])
        img_attn, txt_attn = self.attn(img_in, txt_in, image_freqs, text_freqs, mask)
        image = _gate(image, img_attn, img_gate1, target_len)
        text = gated_residual(text, txt_attn, txt_gate1[:, None])

        img_mlp = self.img_mlp(_modulate(_layer_norm(image), img_shift2, img_scale2, target_len))
        image = _gate(image, img_mlp, img_gate2, target_len)
        txt_mlp = self.txt_mlp(modulate(_layer_norm(text), txt_shift2[:, None], txt_scale2[:, None]))
        text = gated_residual(text, txt_mlp, txt_gate2[:, None])
        if image.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            image, text = image.clip(-65504, 65504), text.clip(-65504, 65504)
        return image, text


class NormOut(nn.Module):
    """``norm_out``: LayerNorm without parameters, then ``* (1 + scale) + shift`` from ``linear(silu(temb))``,
    chunked as (scale, shift)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb).to(x.dtype)).chunk(2, dim=-1)
        return modulate(_layer_norm(x), shift[:, None], scale[:, None])


# ---------------------------------------------------------------------------------------------- the model
class QwenImageTrunk(nn.Module):
    """The input embedders and dual-stream blocks the DiT and the InstantX ControlNet share, under the same names
    (``time_text_embed``, ``txt_norm``, ``img_in``, ``txt_in``, ``transformer_blocks``)."""

    def __init__(
        self,
        dim: int,
        in_channels: int,
        joint_attention_dim: int,
        num_layers: int,
        num_attention_heads: int,
        attention_head_dim: int,
        axes_dims_rope: tuple[int, ...],
    ) -> None:
        super().__init__()
        self.axes_dims_rope = axes_dims_rope
        self.time_text_embed = TimeTextEmbed(dim)
        self.txt_norm = RMSNorm(joint_attention_dim, eps=NORM_EPS)
        self.img_in = nn.Linear(in_channels, dim)
        self.txt_in = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(
            QwenImageBlock(dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)
        )

    def embed_prompt(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """``(B, L, joint_attention_dim)`` -> ``(B, L, dim)``: ``txt_in(txt_norm(x))``."""
        return self.txt_in(self.txt_norm(prompt_embeds))

    def embed_inputs(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        image_shapes: Sequence[tuple[int, int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """The blocks' inputs in the dtype of ``latents``: image and text streams, the time embedding, the image
        and text RoPE tables and the joint attention mask."""
        dtype = latents.dtype
        image = self.img_in(latents)
        temb = self.time_text_embed(timestep, dtype)
        text = self.embed_prompt(prompt_embeds.to(dtype))
        freqs = rope_frequencies(image_shapes, text.shape[1], self.axes_dims_rope, latents.device)
        return image, text, temb, freqs, joint_attention_mask(prompt_mask, image.shape[1])


class QwenImageDiT(QwenImageTrunk):
    """The Qwen-Image DiT, parameter names as in Qwen's ``transformer/`` files (and diffusers).

    Build a released size without allocating memory with ``with torch.device("meta"): QwenImageDiT(config)`` and
    load the shards with ``load_state_dict(state_dict, assign=True)`` (or ``ds_loader.load_model``).
    """

    # Layers ds-vram keeps in the computation dtype when the rest is stored in FP8: the embedders read raw inputs
    # (latents, prompt features, 1000-scaled timestep sinusoids) and feed every block, the output layers write the
    # prediction; together they are about 0.1 % of the parameters.
    ds_vram_never_fp8: ClassVar[tuple[str, ...]] = (
        "time_text_embed.*",
        "img_in",
        "txt_in",
        "norm_out.*",
        "proj_out",
    )

    def __init__(self, config: QwenImageDiTConfig) -> None:
        c = config
        super().__init__(
            c.inner_dim,
            c.in_channels,
            c.joint_attention_dim,
            c.num_layers,
            c.num_attention_heads,
            c.attention_head_dim,
            c.axes_dims_rope,
        )
        self.config = config
        self.norm_out = NormOut(c.inner_dim)
        self.proj_out = nn.Linear(c.inner_dim, config.patch_dim)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        image_shapes: Sequence[tuple[int, int, int]],
        block_residual: BlockResidual | None = None,
    ) -> torch.Tensor:
        """The flow-matching velocity (noise minus clean image) for every image token.

        Args:
            latents: ``(B, N, in_channels)`` packed tokens (:func:`pack_latents`): the target image's first, then
                each reference (edit) image's, in order.
            timestep: ``(B,)`` sigma in [0, 1] (1 is pure noise); the model multiplies by 1000 inside.
            prompt_embeds: ``(B, L, joint_attention_dim)`` Qwen2.5-VL features, zero-padded to a common ``L``.
            prompt_mask: ``(B, L)`` bool, True at valid tokens, or None (all valid). Padded tokens are masked out as
                attention keys; text positions run over all ``L`` tokens.
            image_shapes: ``(frames, h_tokens, w_tokens)`` per image, the target first; the same for every sample;
                the token counts must add up to ``N``.
            block_residual: called after block ``i`` with the image-stream hidden states ``(B, N, dim)``; a returned
                ``(B, M, dim)`` tensor (``M <= N``) is added to the first ``M`` tokens (how the blockwise and
                InstantX ControlNets enter, without the DiT knowing them).

        Returns:
            ``(B, N, patch_size**2 * out_channels)`` for all tokens in the computation dtype (that of ``latents``);
            the pipeline keeps the target's first tokens.
        """
        target_len = check_inputs(
            "QwenImageDiT",
            self.config.in_channels,
            self.config.joint_attention_dim,
            latents,
            timestep,
            prompt_embeds,
            prompt_mask,
            image_shapes,
        )
        b = latents.shape[0]
        if self.config.zero_cond_t:
            timestep = torch.cat([timestep, torch.zeros_like(timestep)])
        image, text, temb, (image_freqs, text_freqs), mask = self.embed_inputs(
            latents, timestep, prompt_embeds, prompt_mask, image_shapes
        )
        split = target_len if self.config.zero_cond_t else None

        for index, block in enumerate(self.transformer_blocks):
            image, text = block(image, text, temb, image_freqs, text_freqs, mask, split)
            if block_residual is not None:
                residual = block_residual(index, image)
                if residual is not None:
                    image = self._add_residual(image, residual, index)
        return self.proj_out(self.norm_out(image, temb[:b]))

    @staticmethod
    def _add_residual(image: torch.Tensor, residual: torch.Tensor, index: int) -> torch.Tensor:
        b, n, dim = image.shape
        if residual.ndim != 3 or residual.shape[0] != b or residual.shape[2] != dim or residual.shape[1] > n:
            raise ValueError(
                f"QwenImageDiT: block_residual for block {index} has shape {tuple(residual.shape)}, expected "
                f"({b}, M, {dim}) with M <= {n} image tokens"
            )
        residual = residual.to(image.dtype)
        if residual.shape[1] == n:
            return image + residual
        length = residual.shape[1]
        return torch.cat([image[:, :length] + residual, image[:, length:]], dim=1)


def check_inputs(
    owner: str,
    in_channels: int,
    joint_attention_dim: int,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    image_shapes: Sequence[tuple[int, int, int]],
) -> int:
    """Shapes of the forward arguments of the DiT or the InstantX ControlNet, checked up front so a mistake names
    the argument; returns the target's token count."""
    if latents.ndim != 3 or latents.shape[2] != in_channels:
        raise ValueError(
            f"{owner}: latents must be packed tokens (B, N, {in_channels}), got {tuple(latents.shape)}; "
            "use pack_latents"
        )
    b, n = latents.shape[:2]
    if tuple(timestep.shape) != (b,):
        raise ValueError(f"{owner}: timestep has shape {tuple(timestep.shape)}, expected ({b},)")
    if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != b or prompt_embeds.shape[2] != joint_attention_dim:
        raise ValueError(
            f"{owner}: prompt_embeds has shape {tuple(prompt_embeds.shape)}, expected ({b}, L, {joint_attention_dim})"
        )
    length = prompt_embeds.shape[1]
    if prompt_mask is not None and (prompt_mask.dtype != torch.bool or tuple(prompt_mask.shape) != (b, length)):
        raise ValueError(
            f"{owner}: prompt_mask must be a bool tensor of shape ({b}, {length}), got "
            f"{prompt_mask.dtype} {tuple(prompt_mask.shape)}"
        )
    shapes = [tuple(shape) for shape in image_shapes]
    if not shapes or any(len(s) != 3 or any(not isinstance(v, int) or v <= 0 for v in s) for s in shapes):
        raise ValueError(
            f"{owner}: image_shapes={image_shapes!r} must be a non-empty list of (frames, h_tokens, "
            "w_tokens) positive integers, the target first"
        )
    total = sum(f * h * w for f, h, w in shapes)
    if total != n:
        raise ValueError(
            f"{owner}: image_shapes {shapes} give {total} tokens but latents have {n}; one entry per image "
            "(the target, then each reference), in tokens (latent size / 2)"
        )
    return shapes[0][0] * shapes[0][1] * shapes[0][2]
