"""The Z-Image diffusion transformer, with the parameter names of the official Tongyi-MAI release.

``ZImageDiT(ZImageDiTConfig.turbo())`` has exactly the keys and shapes of ``transformer/*.safetensors`` in
Tongyi-MAI/Z-Image-Turbo (and Z-Image, and Z-Image-Omni-Base with ``omni_base()``), which are also the names of
diffusers' ``ZImageTransformer2DModel``, so the files load with ``load_state_dict(strict=True)`` and no conversion.
The math follows the official ``src/zimage/transformer.py``:

1. the timestep ``t * 1000`` becomes a 256-d sinusoid and, through ``t_embedder``, the 256-d adaLN input;
2. latents are cut into 2x2 patches (channels last), embedded, padded to a multiple of 32 tokens with the learned
   ``x_pad_token``, and refined by the modulated ``noise_refiner`` blocks;
3. the caption (Qwen3 features of the valid tokens) is embedded (RMSNorm + Linear), padded to a multiple of 32
   with ``cap_pad_token`` and refined by the unmodulated ``context_refiner`` blocks;
4. one sequence ``[image, caption]`` runs through the main ``layers`` and the final layer projects the image
   tokens back to patches.

Every block is scale-only adaLN with tanh gates and no shift, with RMSNorms before and after both the attention
and the SwiGLU feed-forward ("sandwich" norms). Positions are 3-axis and rotate q and k as complex numbers
(theta 256, 32/48/48 channels per axis): caption token ``i`` (its padding included) sits at ``(1 + i, 0, 0)``,
image patch ``(r, c)`` at ``(caption_len_padded + 1, r, c)``, image padding at ``(0, 0, 0)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    modulate,
    patchify,
    rope_angles,
    timestep_embedding,
    unpatchify,
)

__all__ = [
    "SEQ_MULTIPLE",
    "ZImageBlock",
    "ZImageDiT",
    "ZImageDiTConfig",
    "caption_groups",
    "padded_length",
    "sequence_positions",
]

ADALN_EMBED_DIM = 256  # width of the adaLN input (min(dim, 256)); the official ADALN_EMBED_DIM
FREQUENCY_EMBEDDING_SIZE = 256  # sinusoid channels fed to t_embedder
T_EMBEDDER_HIDDEN = 1024  # t_embedder.mlp.0 output width (the official mid_size), whatever the model width
SEQ_MULTIPLE = 32  # caption and image token counts are padded to a multiple of this
FINAL_NORM_EPS = 1e-6  # the final LayerNorm (no affine)


@dataclass(frozen=True)
class ZImageDiTConfig:
    """Sizes of a Z-Image DiT; field names are those of the official ``ZImageTransformer2DModel`` arguments.

    Use a preset (``ZImageDiTConfig.turbo()``, ``base()``, ``omni_base()``, ``tiny()``, or
    ``ZImageDiTConfig.preset("turbo")``) and ``dataclasses.replace`` for variations. Turbo and base share one
    architecture; Omni-Base adds the SigLIP image-feature path (``siglip_feat_dim``).
    """

    in_channels: int = 16  # VAE latent channels (the FLUX.1 VAE)
    patch_size: int = 2
    f_patch_size: int = 1  # frames per patch; images have one frame
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2  # noise_refiner and context_refiner blocks each (and siglip_refiner for Omni)
    n_heads: int = 30
    norm_eps: float = 1e-5
    cap_feat_dim: int = 2560  # Qwen3-4B hidden size
    siglip_feat_dim: int | None = None  # Omni-Base: SigLIP2 image features (1152)
    rope_theta: float = 256.0
    t_scale: float = 1000.0  # the model's t in [0, 1] is multiplied by this before the sinusoid
    axes_dims: tuple[int, ...] = (32, 48, 48)  # RoPE channels per position axis; sums to the head dim
    axes_lens: tuple[int, ...] = (1024, 512, 512)  # positions per axis the official rotation tables hold

    PRESETS: ClassVar[tuple[str, ...]] = ("turbo", "base", "omni-base", "tiny")

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims", tuple(self.axes_dims))
        object.__setattr__(self, "axes_lens", tuple(self.axes_lens))
        for name in ("in_channels", "patch_size", "f_patch_size", "dim", "n_heads", "cap_feat_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ZImageDiTConfig.{name}={value!r} must be a positive integer")
        for name in ("n_layers", "n_refiner_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ZImageDiTConfig.{name}={value!r} must be an integer >= 0 (a number of blocks)")
        if self.siglip_feat_dim is not None and (
            not isinstance(self.siglip_feat_dim, int) or self.siglip_feat_dim <= 0
        ):
            raise ValueError(f"ZImageDiTConfig.siglip_feat_dim={self.siglip_feat_dim!r} must be None or positive")
        if self.dim % self.n_heads:
            raise ValueError(
                f"ZImageDiTConfig.dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                "choose dim = n_heads * head_dim"
            )
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ValueError(
                f"ZImageDiTConfig.axes_dims={self.axes_dims} and axes_lens={self.axes_lens} need one entry per "
                "position axis (caption/frame, row, column)"
            )
        if any(not isinstance(d, int) or d <= 0 or d % 2 for d in self.axes_dims) or sum(self.axes_dims) != (
            self.head_dim
        ):
            raise ValueError(
                f"ZImageDiTConfig.axes_dims={self.axes_dims} must be positive even numbers summing to the head "
                f"dimension dim / n_heads = {self.head_dim} (Z-Image: (32, 48, 48) for 128)"
            )
        if not self.norm_eps > 0 or not self.rope_theta > 0 or not self.t_scale > 0:
            raise ValueError(
                f"ZImageDiTConfig: norm_eps={self.norm_eps!r}, rope_theta={self.rope_theta!r} and "
                f"t_scale={self.t_scale!r} must be positive (Z-Image: 1e-5, 256, 1000)"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        """Width of the timestep embedding that modulates every block: ``min(dim, 256)``."""
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden width, ``int(dim / 3 * 8)`` as the reference computes it (10240 for 3840)."""
        return int(self.dim / 3 * 8)

    @property
    def patch_key(self) -> str:
        """The key of the patch embedder and final layer: ``"2-1"`` (``all_x_embedder.2-1``)."""
        return f"{self.patch_size}-{self.f_patch_size}"

    @property
    def patch_dim(self) -> int:
        return self.f_patch_size * self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def turbo(cls) -> ZImageDiTConfig:
        """Z-Image-Turbo: the 6.15 B distilled model (8 steps, no CFG)."""
        return cls()

    @classmethod
    def base(cls) -> ZImageDiTConfig:
        """Z-Image (base): the same architecture as Turbo, undistilled."""
        return cls()

    @classmethod
    def omni_base(cls) -> ZImageDiTConfig:
        """Z-Image-Omni-Base: the base architecture plus the SigLIP2 path (``siglip_embedder``, ``siglip_refiner``,
        ``siglip_pad_token``) for reference images."""
        return cls(siglip_feat_dim=1152)

    @classmethod
    def tiny(cls) -> ZImageDiTConfig:
        """The released architecture at test size: width 64, 2 heads of 32, 2 main and 2 + 2 refiner blocks, a
        32-wide caption (a tiny Qwen3)."""
        return cls(dim=64, n_layers=2, n_refiner_layers=2, n_heads=2, cap_feat_dim=32, axes_dims=(8, 12, 12))

    @classmethod
    def preset(cls, name: str) -> ZImageDiTConfig:
        """The config of a preset by name (one of ``ZImageDiTConfig.PRESETS``; ``omni_base`` also works)."""
        key = name.strip().lower().replace("_", "-")
        if key not in cls.PRESETS:
            raise ValueError(f"unknown Z-Image DiT preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return getattr(cls, key.replace("-", "_"))()


# ---------------------------------------------------------------------------------------------- sequence layout
def padded_length(length: int) -> int:
    """``length`` rounded up to a multiple of 32, the padding of every caption and image sequence."""
    return -(-length // SEQ_MULTIPLE) * SEQ_MULTIPLE


def caption_groups(text_mask: torch.Tensor | None, batch: int, length: int) -> list[tuple[list[int], int]]:
    """Samples that share a padded caption length, with that length: ``[(sample indices, padded length), ...]``.

    The official model pads each sample's caption (its valid tokens, ``text_mask``) to a multiple of 32 and gives
    the image positions after it, so samples whose padded lengths differ have differently laid-out sequences.
    ``ZImageDiT.forward`` runs each group as one batch without an attention mask, which is what the official
    model computes for each sample of a mixed batch (its batch padding is masked out).
    """
    if text_mask is None:
        return [(list(range(batch)), padded_length(length))]
    groups: dict[int, list[int]] = {}
    for index, count in enumerate(text_mask.sum(dim=1).tolist()):
        groups.setdefault(padded_length(int(count)), []).append(index)
    return [(indices, size) for size, indices in groups.items()]


def sequence_positions(caption_len: int, grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Positions ``(image_len_padded + caption_len, 3)`` of one unified sequence ``[image, caption]``.

    ``caption_len`` is the padded caption length and ``grid`` the image's patch grid (rows, columns). Image patch
    ``(r, c)`` is at ``(caption_len + 1, r, c)``, image padding at ``(0, 0, 0)``, caption token ``i`` (padding
    included) at ``(1 + i, 0, 0)``.
    """
    rows, cols = grid
    image_len = rows * cols
    image = torch.zeros(padded_length(image_len), 3, dtype=torch.long, device=device)
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    image[:image_len, 0] = caption_len + 1
    image[:image_len, 1] = r.flatten()
    image[:image_len, 2] = c.flatten()
    caption = torch.zeros(caption_len, 3, dtype=torch.long, device=device)
    caption[:, 0] = torch.arange(1, caption_len + 1, device=device)
    return torch.cat([image, caption])


def rope_frequencies(positions: torch.Tensor, config: ZImageDiTConfig) -> torch.Tensor:
    """Complex rotations ``(..., head_dim // 2)`` for integer positions.

    As the reference's tables: angles in float64, rounded to float32, then ``polar`` in float32 (complex64).
    """
    angles = rope_angles(positions, config.axes_dims, config.rope_theta).float()
    return torch.polar(torch.ones_like(angles), angles)


# ---------------------------------------------------------------------------------------------- layers
class Attention(nn.Module):
    """Self-attention without biases: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, per-head RMS ``norm_q``/``norm_k``,
    complex RoPE on q and k."""

    def __init__(self, dim: int, n_heads: int, eps: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        head_dim = dim // n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.norm_q = RMSNorm(head_dim, eps=eps)
        self.norm_k = RMSNorm(head_dim, eps=eps)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        heads = (self.n_heads, -1)
        q = apply_rope_complex(self.norm_q(self.to_q(x).unflatten(-1, heads)), freqs)
        k = apply_rope_complex(self.norm_k(self.to_k(x).unflatten(-1, heads)), freqs)
        v = self.to_v(x).unflatten(-1, heads)
        return self.to_out[0](attention(q, k, v).flatten(2))


class FeedForward(nn.Module):
    """SwiGLU without biases: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ZImageBlock(nn.Module):
    """A transformer block with sandwich RMSNorms; modulated (main layers, ``noise_refiner``) or not
    (``context_refiner``, ``siglip_refiner``).

    Modulated: ``adaLN_modulation.0`` (a bare Linear on the 256-d timestep embedding, no SiLU) gives
    ``scale_msa, gate_msa, scale_mlp, gate_mlp``; scales enter as ``1 + scale``, gates as ``tanh(gate)``, and there
    is no shift::

        x = x + tanh(gate_msa) * attention_norm2(attention(attention_norm1(x) * (1 + scale_msa)))
        x = x + tanh(gate_mlp) * ffn_norm2(feed_forward(ffn_norm1(x) * (1 + scale_mlp)))
    """

    def __init__(self, config: ZImageDiTConfig, modulation: bool) -> None:
        super().__init__()
        dim, eps = config.dim, config.norm_eps
        self.attention = Attention(dim, config.n_heads, eps)
        self.feed_forward = FeedForward(dim, config.ffn_hidden_dim)
        self.attention_norm1 = RMSNorm(dim, eps=eps)
        self.ffn_norm1 = RMSNorm(dim, eps=eps)
        self.attention_norm2 = RMSNorm(dim, eps=eps)
        self.ffn_norm2 = RMSNorm(dim, eps=eps)
        self.adaLN_modulation = nn.Sequential(nn.Linear(config.adaln_dim, 4 * dim)) if modulation else None

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        adaln: torch.Tensor | None = None,
        adaln_clean: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x``: ``(B, L, dim)``; ``freqs``: ``(L, head_dim // 2)`` or ``(B, L, head_dim // 2)`` complex;
        ``adaln``: ``(B, adaln_dim)``, required by a modulated block. Omni: ``adaln_clean`` (the embedding of t = 1)
        and ``noise_mask`` ``(B, L)`` bool modulate each token by ``adaln`` where the mask is True (noisy tokens)
        and by ``adaln_clean`` elsewhere (clean reference tokens)."""
        if self.adaLN_modulation is None:
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        if adaln is None:
            raise ValueError("a modulated Z-Image block needs the timestep embedding (adaln)")
        modulation = self.adaLN_modulation(adaln)[:, None]
        if noise_mask is not None:
            modulation = torch.where(noise_mask[..., None], modulation, self.adaLN_modulation(adaln_clean)[:, None])
        scale_msa, gate_msa, scale_mlp, gate_mlp = modulation.chunk(4, dim=-1)
        attn = self.attention(modulate(self.attention_norm1(x), None, scale_msa), freqs)
        x = gated_residual(x, self.attention_norm2(attn), gate_msa.tanh())
        ffn = self.feed_forward(modulate(self.ffn_norm1(x), None, scale_mlp))
        return gated_residual(x, self.ffn_norm2(ffn), gate_mlp.tanh())


class TimestepEmbedder(nn.Module):
    """``mlp``: Linear(256 -> 1024), SiLU, Linear(1024 -> adaln_dim) on the cos-first sinusoid of ``t * t_scale``."""

    def __init__(self, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, T_EMBEDDER_HIDDEN), nn.SiLU(), nn.Linear(T_EMBEDDER_HIDDEN, out_dim)
        )

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE).to(dtype))


class FinalLayer(nn.Module):
    """LayerNorm (no affine, eps 1e-6) scaled by ``1 + adaLN_modulation(c)`` (SiLU, Linear; scale only), then
    ``linear`` to patches."""

    def __init__(self, dim: int, adaln_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim))

    def forward(
        self,
        x: torch.Tensor,
        adaln: torch.Tensor,
        adaln_clean: torch.Tensor | None = None,
        noise_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        scale = self.adaLN_modulation(adaln)[:, None]
        if noise_mask is not None:
            scale = torch.where(noise_mask[..., None], scale, self.adaLN_modulation(adaln_clean)[:, None])
        return self.linear(modulate(F.layer_norm(x, x.shape[-1:], eps=FINAL_NORM_EPS), None, scale))


# ---------------------------------------------------------------------------------------------- the model
class ZImageDiT(nn.Module):
    """The Z-Image DiT (Turbo, base, Omni-Base), parameter names as in Tongyi-MAI's ``transformer/`` files.

    Build a released size without allocating memory with ``with torch.device("meta"): ZImageDiT(config)`` and load
    the checkpoint with ``load_state_dict(state_dict, assign=True)`` (or ``ds_loader.load_model``).
    """

    # Layers ds-vram keeps in the computation dtype when the rest is stored in FP8: the embedders read raw inputs
    # (latents, Qwen3 features, 1000-scaled timestep sinusoids) and feed every block, and the final layer writes
    # the prediction itself (diffusers skips layerwise casting for t_embedder and cap_embedder for the same
    # reason). Together they are well under 0.1% of the parameters.
    ds_vram_never_fp8: ClassVar[tuple[str, ...]] = (
        "t_embedder.*",
        "cap_embedder.*",
        "siglip_embedder.*",
        "all_x_embedder.*",
        "all_final_layer.*",
    )

    def __init__(self, config: ZImageDiTConfig) -> None:
        super().__init__()
        self.config = config
        dim, key = config.dim, config.patch_key
        self.all_x_embedder = nn.ModuleDict({key: nn.Linear(config.patch_dim, dim)})
        self.all_final_layer = nn.ModuleDict({key: FinalLayer(dim, config.adaln_dim, config.patch_dim)})
        self.noise_refiner = nn.ModuleList(ZImageBlock(config, True) for _ in range(config.n_refiner_layers))
        self.context_refiner = nn.ModuleList(ZImageBlock(config, False) for _ in range(config.n_refiner_layers))
        self.t_embedder = TimestepEmbedder(config.adaln_dim)
        self.cap_embedder = nn.Sequential(
            RMSNorm(config.cap_feat_dim, eps=config.norm_eps), nn.Linear(config.cap_feat_dim, dim)
        )
        if config.siglip_feat_dim is not None:
            self.siglip_embedder = nn.Sequential(
                RMSNorm(config.siglip_feat_dim, eps=config.norm_eps), nn.Linear(config.siglip_feat_dim, dim)
            )
            self.siglip_refiner = nn.ModuleList(ZImageBlock(config, False) for _ in range(config.n_refiner_layers))
            self.siglip_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, dim))
        self.layers = nn.ModuleList(ZImageBlock(config, True) for _ in range(config.n_layers))

    # ------------------------------------------------------------------ pieces (shared with the ControlNet)
    def time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B,)`` model t in [0, 1] -> ``(B, adaln_dim)`` adaLN input; the sinusoid of ``t * t_scale`` is taken in
        float32, as the reference does."""
        return self.t_embedder(timestep.float() * self.config.t_scale, dtype)

    def embed_image(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` latents -> ``(B, padded_length(H/2 * W/2), dim)`` patch tokens; the padding is
        ``x_pad_token``."""
        p = self.config.patch_size
        tokens = self.all_x_embedder[self.config.patch_key](patchify(latents, (p, p), channels_last=True))
        return self._pad(tokens, self.x_pad_token, padded_length(tokens.shape[1]))

    def embed_caption(self, caption: torch.Tensor, caption_pad: torch.Tensor) -> torch.Tensor:
        """``(B, Lc, cap_feat_dim)`` features, ``(B, Lc)`` True at padding -> ``(B, Lc, dim)``, padding =
        ``cap_pad_token``."""
        tokens = self.cap_embedder(caption)
        return torch.where(caption_pad[..., None], self.cap_pad_token.to(tokens), tokens)

    @staticmethod
    def _pad(tokens: torch.Tensor, pad_token: torch.Tensor, length: int) -> torch.Tensor:
        extra = length - tokens.shape[1]
        if not extra:
            return tokens
        pad = pad_token.to(tokens).expand(tokens.shape[0], extra, -1)
        return torch.cat([tokens, pad], dim=1)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        controlnet_hints: Mapping[int, torch.Tensor] | None = None,
        controlnet_refiner_hints: Mapping[int, torch.Tensor] | None = None,
        reference_latents: Sequence[Sequence[torch.Tensor]] | None = None,
        siglip_features: Sequence[Sequence[torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:
        """The model's raw prediction; the flow-matching velocity is its negation.

        Omni (Omni-Base editing and generation): pass ``reference_latents``, one list per sample of clean VAE
        latents ``(in_channels, h, w)`` (possibly empty), and ``text`` as one list per sample of caption segments
        ``(L_j, cap_feat_dim)`` (valid tokens only; segment ``j`` of a sample with ``N`` references is clean for
        ``j < N``, noisy from ``N`` on; see ``forward_omni``). ``siglip_features``: per sample, one SigLIP2 feature
        grid ``(rows, cols, siglip_feat_dim)`` per reference, or None.

        Args:
            latents: ``(B, in_channels, H, W)`` VAE latents (H and W divisible by the patch size 2).
            timestep: ``(B,)`` the model's own t in [0, 1]: 0 is pure noise, 1 the clean image, so a sampler at
                noise level sigma passes ``1 - sigma``. The model multiplies by ``t_scale`` (1000) inside, as the
                official model does.
            text: ``(B, L, cap_feat_dim)`` Qwen3 hidden states (the second-to-last layer).
            text_mask: ``(B, L)`` bool, True at the valid tokens of each prompt (which may number differently per
                sample); None: all ``L`` tokens are valid. Only valid tokens enter the model; each sample's caption
                is padded to a multiple of 32 with ``cap_pad_token``. Samples whose padded lengths differ run as
                separate batches, which is what the official model computes for each sample of a mixed batch.
            controlnet_hints: layer index -> residual added to the unified sequence after that main layer (as
                diffusers applies ``controlnet_block_samples``). Each is ``(B, S, dim)`` in the unified layout of
                each sample, ``[image tokens padded to 32, caption tokens padded to 32]``, zero-padded to a common
                ``S`` (diffusers' layout); positions past a sample's own length are ignored.
            controlnet_refiner_hints: noise-refiner block index -> ``(B, image tokens padded to 32, dim)`` residual
                added to the image tokens after that block (the Fun ControlNet 2.x, as VideoX-Fun applies it).

        Returns:
            ``(B, in_channels, H, W)`` in the dtype of the computation (that of ``latents``).
        """
        if reference_latents is not None:
            if text_mask is not None or controlnet_hints or controlnet_refiner_hints:
                raise ValueError("ZImageDiT: the omni path takes caption segments, without text_mask or ControlNet")
            return self.forward_omni(latents, timestep, text, reference_latents, siglip_features)
        b, length = self._check_inputs(latents, timestep, text, text_mask, controlnet_hints)
        groups = caption_groups(text_mask, b, length)
        if len(groups) == 1 and (text_mask is None or bool(text_mask.all())):
            caption_len = groups[0][1]
            caption = F.pad(text, (0, 0, 0, caption_len - length))
            pad = torch.arange(caption_len, device=text.device) >= length
            refiner = controlnet_refiner_hints
            return self._forward_group(latents, timestep, caption, pad.expand(b, -1), controlnet_hints, refiner)
        out = None
        for indices, caption_len in groups:
            index = torch.tensor(indices, device=latents.device)
            caption, pad = self._gather_caption(text, text_mask, indices, caption_len)
            hints = {layer: hint[index] for layer, hint in (controlnet_hints or {}).items()}
            refiner = {block: hint[index] for block, hint in (controlnet_refiner_hints or {}).items()}
            result = self._forward_group(latents[index], timestep[index], caption, pad, hints, refiner)
            if out is None:
                out = result.new_empty((b, *result.shape[1:]))
            out[index] = result
        return out

    @staticmethod
    def _gather_caption(
        text: torch.Tensor, text_mask: torch.Tensor, indices: list[int], caption_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid tokens of samples ``indices``, zero-filled to ``caption_len``, and the padding mask."""
        caption = text.new_zeros((len(indices), caption_len, text.shape[-1]))
        pad = torch.ones(len(indices), caption_len, dtype=torch.bool, device=text.device)
        for row, index in enumerate(indices):
            valid = text[index][text_mask[index]]
            caption[row, : valid.shape[0]] = valid
            pad[row, : valid.shape[0]] = False
        return caption, pad

    def _forward_group(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        caption: torch.Tensor,
        caption_pad: torch.Tensor,
        hints: Mapping[int, torch.Tensor] | None,
        refiner_hints: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Samples with one padded caption length: no attention mask anywhere."""
        p = self.config.patch_size
        height, width = latents.shape[-2:]
        grid = (height // p, width // p)
        adaln = self.time_embedding(timestep, latents.dtype)
        freqs = rope_frequencies(sequence_positions(caption.shape[1], grid, latents.device), self.config)

        x = self.embed_image(latents)
        image_len = x.shape[1]
        x_freqs, cap_freqs = freqs[:image_len], freqs[image_len:]
        for index, block in enumerate(self.noise_refiner):
            x = block(x, x_freqs, adaln)
            if refiner_hints and index in refiner_hints:
                x = x + refiner_hints[index].to(x)
        cap = self.embed_caption(caption, caption_pad)
        for block in self.context_refiner:
            cap = block(cap, cap_freqs)

        unified = torch.cat([x, cap], dim=1)
        for index, block in enumerate(self.layers):
            unified = block(unified, freqs, adaln)
            if hints and index in hints:
                unified = unified + self._hint(hints[index], unified)
        out = self.all_final_layer[self.config.patch_key](unified[:, : grid[0] * grid[1]], adaln)
        return unpatchify(out, (height, width), (p, p), channels_last=True)

    # ------------------------------------------------------------------ Omni
    def forward_omni(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        captions: Sequence[Sequence[torch.Tensor]],
        reference_latents: Sequence[Sequence[torch.Tensor]],
        siglip_features: Sequence[Sequence[torch.Tensor] | None] | None = None,
    ) -> torch.Tensor:
        """The Omni-Base forward: reference images (clean) and the noisy target in one sequence.

        Each sample's sequence is ``[caption segments, image latents (references, then the target), SigLIP2 tokens
        (references, then 32 pad tokens for the target)]``, each item padded to 32. Two timestep embeddings modulate
        it token by token: the noisy ``timestep`` for the target (its image tokens, its caption segments and its
        SigLIP padding) and t = 1 for the clean references. Positions are diffusers' ``patchify_and_embed_omni``:
        caption segment ``j`` starts where the previous ended plus two (its image and SigLIP slots), image ``j`` sits
        at the frame index where caption segment ``j`` ends, its SigLIP grid one after, stretched to the latent size.

        Args:
            latents: ``(B, in_channels, H, W)`` the noisy target.
            timestep: ``(B,)`` the model's t of the target in [0, 1].
            captions: per sample, ``N + 2`` caption segments ``(L_j, cap_feat_dim)`` (valid tokens) for ``N``
                references (diffusers' omni prompt template; segment ``j >= N`` is the target's).
            reference_latents: per sample, ``N`` clean latents ``(in_channels, h, w)``.
            siglip_features: per sample, ``N`` SigLIP2 grids ``(rows, cols, siglip_feat_dim)`` or None (no SigLIP
                tokens; also when ``N`` is 0).

        Returns:
            ``(B, in_channels, H, W)`` the raw prediction for the target.
        """
        c = self.config
        b = latents.shape[0]
        if latents.ndim != 4 or latents.shape[1] != c.in_channels or tuple(timestep.shape) != (b,):
            raise ValueError(
                f"ZImageDiT omni: latents must be (B, {c.in_channels}, H, W) and timestep (B,), got "
                f"{tuple(latents.shape)} and {tuple(timestep.shape)}"
            )
        if (
            len(captions) != b
            or len(reference_latents) != b
            or (siglip_features is not None and len(siglip_features) != b)
        ):
            raise ValueError(f"ZImageDiT omni: captions, reference_latents and siglip_features need {b} entries")
        adaln = self.time_embedding(timestep, latents.dtype)
        adaln_clean = self.time_embedding(torch.ones_like(timestep), latents.dtype)
        out = []
        for i in range(b):
            sigs = siglip_features[i] if siglip_features is not None else None
            refs = list(reference_latents[i])
            if sigs is not None and len(sigs) == 0:
                sigs = None
            if sigs is not None and (c.siglip_feat_dim is None or len(sigs) != len(refs)):
                raise ValueError(
                    "ZImageDiT omni: SigLIP features need a DiT with siglip_feat_dim and one grid per reference "
                    f"(sample {i}: {len(sigs)} grids, {len(refs)} references)"
                )
            if len(captions[i]) < len(refs) + 1:
                raise ValueError(
                    f"ZImageDiT omni: sample {i} has {len(refs)} references and {len(captions[i])} caption segments; "
                    "the omni template has one per reference plus the target's"
                )
            out.append(
                self._omni_sample(latents[i], adaln[i : i + 1], adaln_clean[i : i + 1], captions[i], refs, sigs)
            )
        return torch.stack(out)

    def _omni_sample(
        self,
        target: torch.Tensor,
        adaln: torch.Tensor,
        adaln_clean: torch.Tensor,
        segments: Sequence[torch.Tensor],
        refs: list[torch.Tensor],
        sigs: Sequence[torch.Tensor] | None,
    ) -> torch.Tensor:
        c = self.config
        p, device, dtype = c.patch_size, target.device, target.dtype
        images = [ref.to(dtype) for ref in refs] + [target]
        noisy = [False] * len(refs) + [True]

        # Captions: positions as diffusers lays them out. Each segment's list is its padded length of running
        # positions followed by (0, 0, 0) once per pad token; the lists are concatenated and cut to the token count,
        # so a segment after a padded one starts from the previous list's tail.
        cap_tokens, cap_positions, cap_noise, ends = [], [], [], []
        start = 1
        for j, segment in enumerate(segments):
            length = segment.shape[0]
            size = padded_length(length)
            tokens = self.cap_embedder(segment.to(dtype))[None]
            cap_tokens.append(self._pad(tokens, self.cap_pad_token, size))
            running = torch.zeros(size, 3, dtype=torch.long, device=device)
            running[:, 0] = torch.arange(start, start + size, device=device)
            cap_positions += [running, torch.zeros(size - length, 3, dtype=torch.long, device=device)]
            cap_noise.append(torch.full((size,), noisy[j] if j < len(noisy) else True, device=device))
            start += length
            ends.append(start)
            start += 2
        cap = torch.cat(cap_tokens, dim=1)
        cap_pos = torch.cat(cap_positions)[: cap.shape[1]]

        # Image latents: each padded to 32, at the frame index where its caption segment ends.
        x_tokens, x_positions, x_noise = [], [], []
        for j, image in enumerate(images):
            rows, cols = image.shape[-2] // p, image.shape[-1] // p
            x_tokens.append(self.embed_image(image[None]))
            x_positions.append(self._grid_positions(ends[j], rows, cols, x_tokens[-1].shape[1], device))
            x_noise.append(torch.full((x_tokens[-1].shape[1],), noisy[j], device=device))
        x = torch.cat(x_tokens, dim=1)
        x_noise_mask = torch.cat(x_noise)[None]
        for block in self.noise_refiner:
            x = block(x, rope_frequencies(torch.cat(x_positions), c), adaln, adaln_clean, x_noise_mask)
        cap_freqs = rope_frequencies(cap_pos, c)
        for block in self.context_refiner:
            cap = block(cap, cap_freqs)

        parts, positions, noise = [cap, x], [cap_pos, torch.cat(x_positions)], [torch.cat(cap_noise), x_noise_mask[0]]
        if sigs is not None:
            sig_tokens, sig_positions, sig_noise = [], [], []
            for j, grid in enumerate(sigs):
                rows, cols, channels = grid.shape
                # diffusers flattens the (rows, cols, C) grid as permute(2, 0, 1).reshape(rows * cols, C).
                flat = grid.to(dtype).permute(2, 0, 1).reshape(rows * cols, channels)
                tokens = self.siglip_embedder(flat)[None]
                size = padded_length(rows * cols)
                sig_tokens.append(self._pad(tokens, self.siglip_pad_token, size))
                pos = self._grid_positions(ends[j] + 1, rows, cols, size, device).float()
                # stretched onto the reference's latent size (latent pixels, not patches), truncated to integers
                pos[:, 1] = pos[:, 1] / max(rows - 1, 1) * (images[j].shape[-2] - 1)
                pos[:, 2] = pos[:, 2] / max(cols - 1, 1) * (images[j].shape[-1] - 1)
                sig_positions.append(pos.to(torch.int32).long())
                sig_noise.append(torch.full((size,), False, device=device))
            # the target's slot: 32 pad tokens at (0, 0, 0), noisy
            sig_tokens.append(self.siglip_pad_token.to(x).expand(1, SEQ_MULTIPLE, -1))
            sig_positions.append(torch.zeros(SEQ_MULTIPLE, 3, dtype=torch.long, device=device))
            sig_noise.append(torch.full((SEQ_MULTIPLE,), True, device=device))
            sig = torch.cat(sig_tokens, dim=1)
            sig_pos = torch.cat(sig_positions)
            sig_freqs = rope_frequencies(sig_pos, c)
            for block in self.siglip_refiner:
                sig = block(sig, sig_freqs)
            parts.append(sig)
            positions.append(sig_pos)
            noise.append(torch.cat(sig_noise))

        unified = torch.cat(parts, dim=1)
        freqs = rope_frequencies(torch.cat(positions), c)
        noise_mask = torch.cat(noise)[None]
        for block in self.layers:
            unified = block(unified, freqs, adaln, adaln_clean, noise_mask)
        out = self.all_final_layer[c.patch_key](unified, adaln, adaln_clean, noise_mask)
        height, width = target.shape[-2:]
        first = cap.shape[1] + x.shape[1] - x_tokens[-1].shape[1]
        target_out = out[:, first : first + (height // p) * (width // p)]
        return unpatchify(target_out, (height, width), (p, p), channels_last=True)[0]

    @staticmethod
    def _grid_positions(frame: int, rows: int, cols: int, size: int, device: torch.device) -> torch.Tensor:
        """``(size, 3)``: ``(frame, r, c)`` for the ``rows x cols`` grid, then ``(0, 0, 0)`` for the padding."""
        positions = torch.zeros(size, 3, dtype=torch.long, device=device)
        r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
        positions[: rows * cols, 0] = frame
        positions[: rows * cols, 1] = r.flatten()
        positions[: rows * cols, 2] = c.flatten()
        return positions

    @staticmethod
    def _hint(hint: torch.Tensor, unified: torch.Tensor) -> torch.Tensor:
        length = unified.shape[1]
        if hint.shape[1] < length:
            raise ValueError(
                f"ZImageDiT: a controlnet hint covers {hint.shape[1]} tokens of a {length}-token sequence "
                "(image tokens padded to 32, then the caption padded to 32)"
            )
        return hint[:, :length].to(unified)

    def _check_inputs(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        hints: Mapping[int, torch.Tensor] | None,
    ) -> tuple[int, int]:
        """Shapes of the forward arguments, checked up front so a mistake names the argument."""
        c = self.config
        if latents.ndim != 4 or latents.shape[1] != c.in_channels:
            raise ValueError(f"ZImageDiT: latents must be (B, {c.in_channels}, H, W), got {tuple(latents.shape)}")
        b, _, height, width = latents.shape
        if height % c.patch_size or width % c.patch_size:
            raise ValueError(
                f"ZImageDiT: latent size {height}x{width} is not divisible by the patch size {c.patch_size}"
            )
        if text.ndim != 3 or text.shape[0] != b or text.shape[2] != c.cap_feat_dim:
            raise ValueError(f"ZImageDiT: text has shape {tuple(text.shape)}, expected ({b}, L, {c.cap_feat_dim})")
        if tuple(timestep.shape) != (b,):
            raise ValueError(f"ZImageDiT: timestep has shape {tuple(timestep.shape)}, expected ({b},)")
        length = text.shape[1]
        if text_mask is not None and (text_mask.dtype != torch.bool or tuple(text_mask.shape) != (b, length)):
            raise ValueError(
                f"ZImageDiT: text_mask must be a bool tensor of shape ({b}, {length}), got "
                f"{text_mask.dtype} {tuple(text_mask.shape)}"
            )
        longest = padded_length(length)
        rows, cols = height // c.patch_size, width // c.patch_size
        limits = (longest + 1, rows - 1, cols - 1)
        if any(value >= size for value, size in zip(limits, c.axes_lens, strict=True)):
            raise ValueError(
                f"ZImageDiT: positions (caption {longest} tokens, patch grid {rows}x{cols}) exceed the model's "
                f"position range {c.axes_lens}; use fewer prompt tokens or a smaller image"
            )
        for layer, hint in (hints or {}).items():
            if not 0 <= layer < c.n_layers:
                raise ValueError(f"ZImageDiT: controlnet hint for layer {layer}; the model has {c.n_layers} layers")
            if hint.ndim != 3 or hint.shape[0] != b or hint.shape[2] != c.dim:
                raise ValueError(
                    f"ZImageDiT: controlnet hint {layer} has shape {tuple(hint.shape)}, expected ({b}, S, {c.dim})"
                )
        return b, length
