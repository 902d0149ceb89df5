"""The FLUX.1 diffusion transformer, with the parameter names of the official BFL release.

``FluxDiT(FluxDiTConfig.dev())`` has exactly the keys and shapes of ``flux1-dev.safetensors`` (and likewise
for schnell, Krea-dev, Kontext-dev and Fill-dev), so those files load with ``load_state_dict(strict=True)``
and no conversion. The math follows black-forest-labs/flux ``src/flux/model.py`` and ``modules/layers.py``:
embed, run the double-stream blocks (separate weights for image and text, joint attention), concatenate
``[text, image]``, run the single-stream blocks, project the image tokens out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ds_models_core import (
    RMSNorm,
    apply_rope,
    attention,
    gated_residual,
    modulate,
    rope,
    split_modulation,
    timestep_embedding,
)

__all__ = ["FluxDiT", "FluxDiTConfig"]

TIME_EMBED_DIM = 256  # sinusoid channels fed to ``time_in`` and ``guidance_in``
TIME_FACTOR = 1000.0  # the model multiplies timesteps (0..1) and guidance scales by this before the sinusoid
NORM_EPS = 1e-6  # LayerNorm (no affine) and the q/k RMS norms


@dataclass(frozen=True)
class FluxDiTConfig:
    """Sizes of a FLUX.1 DiT; field names are those of BFL's ``FluxParams``.

    Use a preset (``FluxDiTConfig.dev()``, ``schnell()``, ``krea_dev()``, ``kontext_dev()``, ``fill_dev()``,
    ``tiny()``, or ``FluxDiTConfig.preset("dev")``) and ``dataclasses.replace`` for variations.
    """

    in_channels: int = 64  # 16 latent channels x 2x2 patch; Fill-dev: 384 (latent + masked image + mask)
    out_channels: int = 64
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single_blocks: int = 38
    mlp_ratio: float = 4.0
    context_in_dim: int = 4096  # T5 hidden size
    vec_in_dim: int = 768  # CLIP pooled output
    axes_dim: tuple[int, ...] = (16, 56, 56)  # RoPE channels per position axis; sums to the head dim
    theta: int = 10_000
    qkv_bias: bool = True  # double blocks only; the single blocks' linear1 always has a bias
    guidance_embed: bool = True  # guidance-distilled (dev family); schnell has no guidance embedding

    PRESETS: ClassVar[tuple[str, ...]] = ("dev", "schnell", "krea_dev", "kontext_dev", "fill_dev", "tiny")

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))
        for name in ("in_channels", "out_channels", "hidden_size", "num_heads", "context_in_dim", "vec_in_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"FluxDiTConfig.{name}={value!r} must be a positive integer")
        for name in ("depth", "depth_single_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"FluxDiTConfig.{name}={value!r} must be an integer >= 0 (a number of blocks)")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"FluxDiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "choose hidden_size = num_heads * head_dim"
            )
        head_dim = self.hidden_size // self.num_heads
        if any(not isinstance(d, int) or d <= 0 or d % 2 for d in self.axes_dim) or sum(self.axes_dim) != head_dim:
            raise ValueError(
                f"FluxDiTConfig.axes_dim={self.axes_dim} must be positive even numbers summing to the head "
                f"dimension hidden_size / num_heads = {head_dim} (FLUX.1: (16, 56, 56) for 128)"
            )
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(f"FluxDiTConfig.mlp_ratio={self.mlp_ratio!r} must be positive (FLUX.1: 4.0)")
        if not self.theta > 0:
            raise ValueError(f"FluxDiTConfig.theta={self.theta!r} must be positive (FLUX.1: 10000)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def dev(cls) -> FluxDiTConfig:
        """FLUX.1-dev (``flux1-dev.safetensors``): guidance-distilled, about 11.9 B parameters."""
        return cls()

    @classmethod
    def schnell(cls) -> FluxDiTConfig:
        """FLUX.1-schnell: timestep-distilled, no ``guidance_in``."""
        return cls(guidance_embed=False)

    @classmethod
    def krea_dev(cls) -> FluxDiTConfig:
        """FLUX.1-Krea-dev: the dev architecture."""
        return cls()

    @classmethod
    def kontext_dev(cls) -> FluxDiTConfig:
        """FLUX.1-Kontext-dev: the dev architecture; reference images enter as extra image tokens (see forward)."""
        return cls()

    @classmethod
    def fill_dev(cls) -> FluxDiTConfig:
        """FLUX.1-Fill-dev: 384 input channels (64 noisy latent + 64 masked-image latent + 256 mask), 64 out."""
        return cls(in_channels=384)

    @classmethod
    def tiny(cls) -> FluxDiTConfig:
        """The dev architecture at test size: width 64, 2 heads of 32, 2 + 2 blocks; 16-channel latents."""
        return cls(
            hidden_size=64,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            context_in_dim=32,
            vec_in_dim=32,
            axes_dim=(8, 12, 12),
        )

    @classmethod
    def preset(cls, name: str) -> FluxDiTConfig:
        """The config of a preset by name (one of ``FluxDiTConfig.PRESETS``)."""
        if name not in cls.PRESETS:
            raise ValueError(f"unknown FLUX.1 DiT preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return getattr(cls, name)()


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine parameters, as every FLUX.1 norm before a modulation."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """RoPE on q and k, then softmax attention: ``(B, L, heads, head_dim)`` in, ``(B, L, hidden)`` out."""
    return attention(apply_rope(q, pe), apply_rope(k, pe), v).flatten(2)


class MLPEmbedder(nn.Module):
    """``in_layer -> SiLU -> out_layer``: the timestep, guidance and pooled-text embedders."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class QKNorm(nn.Module):
    """Per-head RMS norm of queries and keys (``query_norm.scale``, ``key_norm.scale``), cast to v's dtype."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim, eps=NORM_EPS, parameter_name="scale")
        self.key_norm = RMSNorm(head_dim, eps=NORM_EPS, parameter_name="scale")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """One stream's attention weights in a double block: fused ``qkv``, q/k ``norm``, output ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, L, dim)`` to normalised q, k and v, each ``(B, L, heads, head_dim)``."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """``lin(silu(vec))`` cut into (shift, scale, gate) triples of shape ``(B, 1, dim)``: two triples, or one."""

    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.chunks = 6 if double else 3
        self.lin = nn.Linear(dim, self.chunks * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return split_modulation(self.lin(F.silu(vec))[:, None, :], self.chunks)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    """Linear, tanh-GELU, Linear; a Sequential so the checkpoint keys are ``mlp.0`` and ``mlp.2``."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly over ``[text, image]``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden_dim: int, qkv_bias: bool) -> None:
        super().__init__()
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = _mlp(hidden_size, mlp_hidden_dim)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden_dim)

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.heads(modulate(_layer_norm(img), img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(_layer_norm(txt), txt_shift1, txt_scale1))
        q, k, v = (torch.cat(pair, dim=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        txt_attn, img_attn = _attention(q, k, v, pe).split((txt.shape[1], img.shape[1]), dim=1)

        img = gated_residual(img, self.img_attn.proj(img_attn), img_gate1)
        img = gated_residual(img, self.img_mlp(modulate(_layer_norm(img), img_shift2, img_scale2)), img_gate2)
        txt = gated_residual(txt, self.txt_attn.proj(txt_attn), txt_gate1)
        txt = gated_residual(txt, self.txt_mlp(modulate(_layer_norm(txt), txt_shift2, txt_scale2)), txt_gate2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over ``[text, image]``: attention and MLP in parallel (``linear1`` in, ``linear2`` out)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.split = (3 * hidden_size, mlp_hidden_dim)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + mlp_hidden_dim)  # q, k, v and the MLP input
        self.linear2 = nn.Linear(hidden_size + mlp_hidden_dim, hidden_size)  # attention and MLP outputs
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(_layer_norm(x), shift, scale)).split(self.split, dim=-1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).unbind(2)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((_attention(q, k, v, pe), F.gelu(mlp, approximate="tanh")), dim=-1))
        return gated_residual(x, out, gate)


class LastLayer(nn.Module):
    """Modulated LayerNorm and the output projection; ``adaLN_modulation`` gives (shift, scale) in that order."""

    def __init__(self, hidden_size: int, out_channels: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, out_channels)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        # BFL order; diffusers' norm_out stores (scale, shift), its converters swap the halves.
        shift, scale = split_modulation(self.adaLN_modulation(vec)[:, None, :], 2)
        return self.linear(modulate(_layer_norm(x), shift, scale))


class FluxDiT(nn.Module):
    """The FLUX.1 DiT (dev, schnell, Krea-dev, Kontext-dev, Fill-dev), parameter names as in BFL's files.

    Build a released size without allocating memory with ``with torch.device("meta"): FluxDiT(config)`` and
    load the checkpoint with ``load_state_dict(state_dict, assign=True)``.
    """

    # Layers that ds-vram keeps in the computation dtype when the rest is stored in FP8. The embedders read
    # unnormalised inputs (T5 features with large outliers, latents, 1000-scaled timestep sinusoids) and feed
    # every block: an FP8 error there is not averaged out later. time_in, vector_in and guidance_in make
    # ``vec``, which sets every block's shift/scale/gate; final_layer writes the velocity itself. Together they
    # are about 0.5% of the parameters (~64 M of 11.9 B), so keeping them costs little memory.
    ds_vram_never_fp8: ClassVar[tuple[str, ...]] = (
        "img_in",
        "txt_in",
        "time_in.*",
        "vector_in.*",
        "guidance_in.*",
        "final_layer.*",
    )

    def __init__(self, config: FluxDiTConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.img_in = nn.Linear(config.in_channels, hidden)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, hidden)
        self.vector_in = MLPEmbedder(config.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, hidden) if config.guidance_embed else None
        self.txt_in = nn.Linear(config.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, config.num_heads, config.mlp_hidden_dim, config.qkv_bias)
            for _ in range(config.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, config.num_heads, config.mlp_hidden_dim)
            for _ in range(config.depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden, config.out_channels)

    def forward(
        self,
        img: torch.Tensor,
        img_ids: torch.Tensor,
        txt: torch.Tensor,
        txt_ids: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        *,
        ref_tokens: torch.Tensor | None = None,
        ref_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity of the image tokens.

        Args:
            img: ``(B, L, in_channels)`` patchified latents (``ds_models_core.patchify``); for Fill-dev the
                noisy latent tokens concatenated on channels with the masked-image and mask tokens.
            img_ids: ``(B, L, 3)`` positions ``(0, row, col)`` on the patch grid.
            txt: ``(B, S, context_in_dim)`` T5 hidden states.
            txt_ids: ``(B, S, 3)`` positions, zeros for text.
            timesteps: ``(B,)`` flow-matching time in [0, 1] (sigma; 1 is pure noise). The model multiplies by
                1000 in the dtype given, as the reference does.
            y: ``(B, vec_in_dim)`` CLIP pooled output.
            guidance: ``(B,)`` embedded guidance scale (e.g. 3.5) for guidance-distilled models; ignored
                when the model has no guidance embedding (schnell), as in the reference.
            ref_tokens, ref_ids: Kontext reference images, ``(B, R, in_channels)`` tokens and their
                ``(B, R, 3)`` positions ``(1, row, col)``. They are appended after the image tokens, as BFL's
                ``denoise`` does, and their outputs are dropped. Passing them already concatenated to
                ``img``/``img_ids`` is the same computation, with ``L + R`` output tokens.

        Returns:
            ``(B, L, out_channels)``, in the dtype of ``img``.
        """
        if (ref_tokens is None) != (ref_ids is None):
            raise ValueError("FluxDiT: pass both ref_tokens and ref_ids (Kontext reference images), or neither")
        self._check_inputs(
            img=img,
            img_ids=img_ids,
            txt=txt,
            txt_ids=txt_ids,
            timesteps=timesteps,
            y=y,
            guidance=guidance,
            ref_tokens=ref_tokens,
            ref_ids=ref_ids,
        )
        n_img = img.shape[1]
        if ref_tokens is not None:
            img, img_ids = torch.cat((img, ref_tokens), dim=1), torch.cat((img_ids, ref_ids), dim=1)

        vec = self.time_in(timestep_embedding(timesteps * TIME_FACTOR, TIME_EMBED_DIM).to(img.dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError(
                    "this FLUX.1 model is guidance-distilled (it has guidance_in): pass guidance, a (B,) tensor "
                    "of the embedded guidance scale such as 3.5"
                )
            vec = vec + self.guidance_in(timestep_embedding(guidance * TIME_FACTOR, TIME_EMBED_DIM).to(img.dtype))
        vec = vec + self.vector_in(y)
        img = self.img_in(img)
        txt = self.txt_in(txt)
        pe = rope(torch.cat((txt_ids, img_ids), dim=1), self.config.axes_dim, self.config.theta)

        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        img = x[:, txt.shape[1] :]

        return self.final_layer(img, vec)[:, :n_img]

    def _check_inputs(self, **inputs: torch.Tensor | None) -> None:
        """Shapes of the forward arguments, checked up front so a mistake names the argument."""
        img, txt = inputs["img"], inputs["txt"]
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError(
                f"FluxDiT: img and txt must be (B, L, C) token tensors, got {tuple(img.shape)} and "
                f"{tuple(txt.shape)}; patchify latents with ds_models_core.patchify"
            )
        c, b, axes = self.config, img.shape[0], len(self.config.axes_dim)
        refs = inputs["ref_tokens"].shape[1] if inputs["ref_tokens"] is not None else 0
        expected = {
            "img": (b, img.shape[1], c.in_channels),
            "img_ids": (b, img.shape[1], axes),
            "txt": (b, txt.shape[1], c.context_in_dim),
            "txt_ids": (b, txt.shape[1], axes),
            "timesteps": (b,),
            "y": (b, c.vec_in_dim),
            "guidance": (b,),
            "ref_tokens": (b, refs, c.in_channels),
            "ref_ids": (b, refs, axes),
        }
        for name, shape in expected.items():
            tensor = inputs[name]
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ValueError(f"FluxDiT: {name} has shape {tuple(tensor.shape)}, expected {shape}")
