"""The two Qwen-Image ControlNets, with the released parameter names; both enter the DiT as its ``block_residual``.

**Blockwise ControlNet** (DiffSynth-Studio's Qwen-Image-Blockwise-ControlNet Canny, Depth and Inpaint,
``model.safetensors``): ``img_in`` embeds the control tokens once; after DiT block ``i``, ``controlnet_blocks.i``
adds ``output_proj(gelu(input_proj(x_rms(x) + y_rms(c)))) * scale`` to the target's image tokens ``x`` (RMSNorms
eps 1e-6, exact GELU). One block per DiT block (60).

**ControlNet Union** (InstantX/Qwen-Image-ControlNet-Union, and -Inpainting; diffusers' ``QwenImageControlNetModel``):
a 5-block copy of the DiT's front (``img_in``, ``txt_norm``/``txt_in``, ``time_text_embed``, dual-stream
``transformer_blocks``) whose image input is ``img_in(latents) + controlnet_x_embedder(control)``; each block's
image stream goes through a Linear ``controlnet_blocks.k`` (zero-initialised in training) and, times the scale,
is added after DiT block ``i`` as sample ``i // ceil(dit_layers / samples)`` (diffusers' rule: with 60 DiT blocks
and 5 samples, blocks 0-11 get sample 0, 12-23 sample 1...). As diffusers' pipeline does, compute the samples once
per step from the positive prompt and use them for the negative pass too.

Conditioning (both): packed tokens ``(B, N_target, 64 + extra)`` at the target's size (:func:`pack_latents`) of

- Canny, Depth, Union: the control image's VAE latents, normalised as the DiT's (``(z - mean) / std``), 16 channels;
- Inpaint (blockwise ``additional_in_dim=4``, InstantX Inpainting ``extra_condition_channels=4``): 17 channels,
  :func:`inpaint_conditioning`: the latents of the control image with the pixels to repaint set to black
  (:func:`mask_control_image`), then ``1 - mask`` resized (nearest) to the latent size, so 1 marks kept pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec
from ds_models_core import RMSNorm
from ds_models_qwen_image.dit import (
    NORM_EPS,
    BlockResidual,
    QwenImageTrunk,
    check_inputs,
)
from ds_models_qwen_image.dit_specs import rope_axes

__all__ = [
    "BLOCKWISE_CONTROLNET_SPEC",
    "CONTROLNET_SPECS",
    "UNION_CONTROLNET_SPEC",
    "BlockwiseControlBlock",
    "QwenImageBlockwiseControlNet",
    "QwenImageBlockwiseControlNetConfig",
    "QwenImageControlNetUnion",
    "QwenImageControlNetUnionConfig",
    "detect_blockwise_controlnet",
    "detect_union_controlnet",
    "inpaint_conditioning",
    "mask_control_image",
    "sample_residual",
    "sum_block_residuals",
]

LATENT_TOKEN_DIM = 64  # 16 latent channels x 2 x 2
INPAINT_EXTRA_DIM = 4  # the mask channel x 2 x 2


# ---------------------------------------------------------------------------------------------- conditioning
def mask_control_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The control image of an inpaint ControlNet: ``image`` ``(B, 3, H, W)`` in [-1, 1] with the pixels to repaint
    (``mask`` ``(B, 1, H, W)`` in [0, 1], > 0.5) set to black (-1), before VAE encoding."""
    return image.masked_fill(mask.to(image.device) > 0.5, -1.0)


def inpaint_conditioning(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(B, 16, h, w)`` latents of :func:`mask_control_image` and the pixel ``mask`` ``(B, 1, H, W)`` (1 = repaint)
    -> ``(B, 17, h, w)``: the latents, then ``1 - mask`` resized (nearest) to ``(h, w)``; pack it for a ControlNet."""
    small = F.interpolate(mask.to(latents), size=latents.shape[-2:], mode="nearest")
    return torch.cat([latents, 1 - small], dim=1)


def sum_block_residuals(residuals: Sequence[BlockResidual]) -> BlockResidual | None:
    """One ``block_residual`` that adds up several (several ControlNets, or several inputs of one); None if none."""
    residuals = list(residuals)
    if not residuals:
        return None
    if len(residuals) == 1:
        return residuals[0]

    def total(index: int, image: torch.Tensor) -> torch.Tensor | None:
        out = None
        for residual in residuals:
            value = residual(index, image)
            if value is None:
                continue
            if out is not None and out.shape != value.shape:
                raise ValueError(
                    f"ControlNet residuals for block {index} differ in shape: {out.shape} vs {value.shape}"
                )
            out = value if out is None else out + value
        return out

    return total


def _check_conditioning(owner: str, conditioning: torch.Tensor, channels: int, batch: int | None = None) -> None:
    if conditioning.ndim != 3 or conditioning.shape[2] != channels or (batch and conditioning.shape[0] != batch):
        raise ValueError(
            f"{owner}: conditioning must be packed control tokens ({batch or 'B'}, N_target, {channels}), got "
            f"{tuple(conditioning.shape)} (pack_latents of the control latents"
            + (", with inpaint_conditioning's mask channel)" if channels % LATENT_TOKEN_DIM else ")")
        )


# ---------------------------------------------------------------------------------------------- blockwise
@dataclass(frozen=True)
class QwenImageBlockwiseControlNetConfig:
    """Sizes of DiffSynth-Studio's blockwise ControlNet (its ``QwenImageBlockWiseControlNet`` arguments).

    Presets: ``canny()`` and ``depth()`` (64 input values per token), ``inpaint()`` (``additional_in_dim=4``: the
    mask channel), ``tiny()`` for ``QwenImageDiTConfig.tiny()``.
    """

    num_layers: int = 60  # one control block per DiT block
    in_dim: int = LATENT_TOKEN_DIM
    additional_in_dim: int = 0
    dim: int = 3072  # the DiT's width

    PRESETS: ClassVar[tuple[str, ...]] = ("canny", "depth", "inpaint", "tiny", "tiny-inpaint")

    def __post_init__(self) -> None:
        for name in ("num_layers", "in_dim", "dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"QwenImageBlockwiseControlNetConfig.{name}={value!r} must be a positive integer")
        if isinstance(self.additional_in_dim, bool) or not isinstance(self.additional_in_dim, int):
            raise ValueError(f"QwenImageBlockwiseControlNetConfig.additional_in_dim={self.additional_in_dim!r}")
        if self.additional_in_dim < 0:
            raise ValueError(
                f"QwenImageBlockwiseControlNetConfig.additional_in_dim={self.additional_in_dim} must be >= 0 "
                "(4 for the Inpaint release)"
            )

    @property
    def conditioning_dim(self) -> int:
        """Values per control token: 64, or 68 for Inpaint."""
        return self.in_dim + self.additional_in_dim

    @classmethod
    def canny(cls) -> QwenImageBlockwiseControlNetConfig:
        return cls()

    @classmethod
    def depth(cls) -> QwenImageBlockwiseControlNetConfig:
        return cls()

    @classmethod
    def inpaint(cls) -> QwenImageBlockwiseControlNetConfig:
        return cls(additional_in_dim=INPAINT_EXTRA_DIM)

    @classmethod
    def tiny(cls) -> QwenImageBlockwiseControlNetConfig:
        return cls(num_layers=2, dim=64)

    @classmethod
    def preset(cls, name: str) -> QwenImageBlockwiseControlNetConfig:
        key = name.strip().lower().replace("_", "-")
        if key not in cls.PRESETS:
            raise ValueError(f"unknown Qwen-Image blockwise ControlNet preset {name!r}; choose one of {cls.PRESETS}")
        if key == "tiny-inpaint":
            return cls(num_layers=2, dim=64, additional_in_dim=INPAINT_EXTRA_DIM)
        return getattr(cls, key)()


class BlockwiseControlBlock(nn.Module):
    """``output_proj(gelu(input_proj(x_rms(x) + y_rms(c))))``: the residual for one DiT block."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x_rms = RMSNorm(dim, eps=NORM_EPS)
        self.y_rms = RMSNorm(dim, eps=NORM_EPS)
        self.input_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, image: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        return self.output_proj(F.gelu(self.input_proj(self.x_rms(image) + self.y_rms(control))))


class QwenImageBlockwiseControlNet(nn.Module):
    """DiffSynth-Studio's Qwen-Image blockwise ControlNet; released files load with no conversion.

    Use: ``dit(..., block_residual=controlnet.block_residual(conditioning, scale))``.
    """

    ds_vram_never_fp8: ClassVar[tuple[str, ...]] = ("img_in",)

    def __init__(self, config: QwenImageBlockwiseControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.img_in = nn.Linear(config.conditioning_dim, config.dim)
        self.controlnet_blocks = nn.ModuleList(BlockwiseControlBlock(config.dim) for _ in range(config.num_layers))

    def zero_init_(self) -> QwenImageBlockwiseControlNet:
        """Zero ``img_in`` and every ``output_proj``, as DiffSynth-Studio starts training: the ControlNet then adds
        nothing until it learns."""
        with torch.no_grad():
            for layer in [self.img_in, *(block.output_proj for block in self.controlnet_blocks)]:
                layer.weight.zero_()
                layer.bias.zero_()
        return self

    def embed(self, conditioning: torch.Tensor) -> torch.Tensor:
        """``(B, N_target, conditioning_dim)`` control tokens -> ``(B, N_target, dim)``."""
        _check_conditioning("QwenImageBlockwiseControlNet", conditioning, self.config.conditioning_dim)
        return self.img_in(conditioning)

    def forward(self, index: int, image: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
        """The residual of block ``index`` for the target's image tokens: ``image`` is the DiT's image stream (its
        first ``control.shape[1]`` tokens are used), ``control`` the output of :meth:`embed`."""
        if not 0 <= index < len(self.controlnet_blocks):
            raise ValueError(
                f"QwenImageBlockwiseControlNet has {len(self.controlnet_blocks)} blocks; the DiT asked for block "
                f"{index} (it needs one ControlNet block per DiT block)"
            )
        return self.controlnet_blocks[index](image[:, : control.shape[1]], control)

    def block_residual(self, conditioning: torch.Tensor, scale: float = 1.0) -> BlockResidual:
        """The DiT's ``block_residual`` for ``conditioning`` (packed control tokens at the target's size, see the
        module), each block's residual times ``scale``. The control tokens are embedded once, here."""
        control = self.embed(conditioning)

        def residual(index: int, image: torch.Tensor) -> torch.Tensor:
            return self(index, image, control.to(image.dtype)) * scale

        return residual


# ---------------------------------------------------------------------------------------------- union (InstantX)
@dataclass(frozen=True)
class QwenImageControlNetUnionConfig:
    """Sizes of the InstantX ControlNet; field names are diffusers' ``QwenImageControlNetModel`` arguments.

    ``extra_condition_channels``: 0 for the Union release, 4 for InstantX's Inpainting one (the mask channel).
    """

    patch_size: int = 2
    in_channels: int = LATENT_TOKEN_DIM
    num_layers: int = 5
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    extra_condition_channels: int = 0

    PRESETS: ClassVar[tuple[str, ...]] = ("union", "inpainting", "tiny")

    def __post_init__(self) -> None:
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        for name in (
            "patch_size",
            "in_channels",
            "num_layers",
            "attention_head_dim",
            "num_attention_heads",
            "joint_attention_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"QwenImageControlNetUnionConfig.{name}={value!r} must be a positive integer")
        if not isinstance(self.extra_condition_channels, int) or self.extra_condition_channels < 0:
            raise ValueError(
                f"QwenImageControlNetUnionConfig.extra_condition_channels={self.extra_condition_channels!r} must be "
                "an integer >= 0"
            )
        axes = self.axes_dims_rope
        if len(axes) != 3 or any(d <= 0 or d % 2 for d in axes) or sum(axes) != self.attention_head_dim:
            raise ValueError(
                f"QwenImageControlNetUnionConfig.axes_dims_rope={axes} must be three positive even numbers summing "
                f"to attention_head_dim={self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def conditioning_dim(self) -> int:
        return self.in_channels + self.extra_condition_channels

    @classmethod
    def union(cls) -> QwenImageControlNetUnionConfig:
        """InstantX/Qwen-Image-ControlNet-Union: 5 blocks (canny, soft edge, depth, pose in one)."""
        return cls()

    @classmethod
    def inpainting(cls) -> QwenImageControlNetUnionConfig:
        """InstantX/Qwen-Image-ControlNet-Inpainting: the Union architecture with the mask channel."""
        return cls(extra_condition_channels=INPAINT_EXTRA_DIM)

    @classmethod
    def tiny(cls) -> QwenImageControlNetUnionConfig:
        """For ``QwenImageDiTConfig.tiny()``: 1 block, width 64."""
        return cls(
            num_layers=1,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(8, 12, 12),
        )

    @classmethod
    def preset(cls, name: str) -> QwenImageControlNetUnionConfig:
        key = name.strip().lower()
        if key not in cls.PRESETS:
            raise ValueError(f"unknown Qwen-Image ControlNet Union preset {name!r}; choose one of {cls.PRESETS}")
        return getattr(cls, key)()


def sample_residual(samples: Sequence[torch.Tensor], dit_layers: int) -> BlockResidual:
    """A ``block_residual`` adding ``samples[i // ceil(dit_layers / len(samples))]`` after DiT block ``i``."""
    if not samples:
        raise ValueError("sample_residual needs at least one ControlNet sample")
    interval = math.ceil(dit_layers / len(samples))

    def residual(index: int, image: torch.Tensor) -> torch.Tensor:
        return samples[index // interval]

    return residual


class QwenImageControlNetUnion(QwenImageTrunk):
    """The InstantX Qwen-Image ControlNet (Union, Inpainting), diffusers' ``QwenImageControlNetModel`` names.

    Use: ``dit(..., block_residual=controlnet.block_residual(dit.config.num_layers, latents, timestep,
    prompt_embeds, prompt_mask, image_shapes, conditioning, scale))`` with the DiT's own target inputs.
    """

    ds_vram_never_fp8: ClassVar[tuple[str, ...]] = (
        "time_text_embed.*",
        "img_in",
        "txt_in",
        "controlnet_x_embedder",
        "controlnet_blocks.*",
    )

    def __init__(self, config: QwenImageControlNetUnionConfig) -> None:
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
        dim = c.inner_dim
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.num_layers))
        self.controlnet_x_embedder = nn.Linear(config.conditioning_dim, dim)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        image_shapes: Sequence[tuple[int, int, int]],
        conditioning: torch.Tensor,
        scale: float = 1.0,
    ) -> list[torch.Tensor]:
        """The scaled samples ``(B, N_target, dim)``, one per block.

        ``latents`` ... ``image_shapes`` are the DiT's inputs for the target alone (``image_shapes`` one entry);
        ``conditioning``: ``(B, N_target, conditioning_dim)`` packed control tokens (see the module).
        """
        c = self.config
        check_inputs(
            "QwenImageControlNetUnion",
            c.in_channels,
            c.joint_attention_dim,
            latents,
            timestep,
            prompt_embeds,
            prompt_mask,
            image_shapes,
        )
        _check_conditioning("QwenImageControlNetUnion", conditioning, c.conditioning_dim, latents.shape[0])
        if conditioning.shape[1] != latents.shape[1]:
            raise ValueError(
                f"QwenImageControlNetUnion: conditioning has {conditioning.shape[1]} tokens, the target latents "
                f"{latents.shape[1]}; the control image must be at the target's size"
            )
        image, text, temb, (image_freqs, text_freqs), mask = self.embed_inputs(
            latents, timestep, prompt_embeds, prompt_mask, image_shapes
        )
        image = image + self.controlnet_x_embedder(conditioning.to(latents.dtype))
        samples = []
        for block, head in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            image, text = block(image, text, temb, image_freqs, text_freqs, mask)
            samples.append(head(image) * scale)
        return samples

    def block_residual(
        self,
        dit_layers: int,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        image_shapes: Sequence[tuple[int, int, int]],
        conditioning: torch.Tensor,
        scale: float = 1.0,
    ) -> BlockResidual:
        """The DiT's ``block_residual`` for one step: runs the ControlNet now and spreads its samples over the
        ``dit_layers`` DiT blocks (:func:`sample_residual`)."""
        samples = self(latents, timestep, prompt_embeds, prompt_mask, image_shapes, conditioning, scale)
        return sample_residual(samples, dit_layers)


# ---------------------------------------------------------------------------------------------- detection
_BLOCKWISE_KEYS = (
    "img_in.weight",
    "controlnet_blocks.0.x_rms.weight",
    "controlnet_blocks.0.y_rms.weight",
    "controlnet_blocks.0.input_proj.weight",
    "controlnet_blocks.0.output_proj.weight",
)
_UNION_KEYS = (
    "controlnet_x_embedder.weight",
    "controlnet_blocks.0.weight",
    "img_in.weight",
    "txt_in.weight",
    "txt_norm.weight",
    "transformer_blocks.0.attn.norm_q.weight",
)


def detect_blockwise_controlnet(view: HeaderView) -> Detection | Mismatch:
    """DiffSynth-Studio's Qwen-Image blockwise ControlNet files (Canny, Depth, Inpaint): ``img_in`` and
    ``controlnet_blocks.N.{x_rms, y_rms, input_proj, output_proj}``, nothing else."""
    if not all(key in view for key in _BLOCKWISE_KEYS):
        close = sum(key in view for key in _BLOCKWISE_KEYS) / len(_BLOCKWISE_KEYS)
        return Mismatch("no img_in with controlnet_blocks.0.{x_rms,y_rms,input_proj,output_proj}", 0.8 * close)
    dim, in_features = view.shape("img_in.weight")
    extra = max(in_features - LATENT_TOKEN_DIM, 0)
    try:
        config = QwenImageBlockwiseControlNetConfig(
            num_layers=view.count_blocks("controlnet_blocks."),
            in_dim=in_features - extra,
            additional_in_dim=extra,
            dim=dim,
        )
    except ValueError as error:
        return Mismatch(str(error), 0.8)
    return Detection("diffsynth", config)


def detect_union_controlnet(view: HeaderView) -> Detection | Mismatch:
    """InstantX's Qwen-Image ControlNets (Union, Inpainting) in diffusers' ``QwenImageControlNetModel`` names."""
    if not all(key in view for key in _UNION_KEYS):
        close = sum(key in view for key in _UNION_KEYS) / len(_UNION_KEYS)
        return Mismatch("no controlnet_x_embedder with controlnet_blocks.0 Linear and Qwen-Image blocks", 0.8 * close)
    dim, in_channels = view.shape("img_in.weight")
    head_dim = view.shape("transformer_blocks.0.attn.norm_q.weight")[0]
    if dim % head_dim:
        return Mismatch(f"the width {dim} is not a multiple of the head width {head_dim}", 0.8)
    json = view.config_json if (view.config_json or {}).get("_class_name") == "QwenImageControlNetModel" else {}
    axes = json.get("axes_dims_rope")
    try:
        config = QwenImageControlNetUnionConfig(
            patch_size=json.get("patch_size", 2),
            in_channels=in_channels,
            num_layers=view.count_blocks("transformer_blocks."),
            attention_head_dim=head_dim,
            num_attention_heads=dim // head_dim,
            joint_attention_dim=view.shape("txt_in.weight")[1],
            axes_dims_rope=tuple(axes) if isinstance(axes, list) else rope_axes(head_dim),
            extra_condition_channels=view.shape("controlnet_x_embedder.weight")[1] - in_channels,
        )
    except ValueError as error:
        return Mismatch(str(error), 0.8)
    return Detection("diffusers", config)


BLOCKWISE_CONTROLNET_SPEC = ModelSpec(
    name="qwen-image.blockwise_controlnet",
    family="qwen-image",
    model_class=QwenImageBlockwiseControlNet,
    config_class=QwenImageBlockwiseControlNetConfig,
    detect=detect_blockwise_controlnet,
    formats={"diffsynth": None},
    never_fp8=QwenImageBlockwiseControlNet.ds_vram_never_fp8,
)
UNION_CONTROLNET_SPEC = ModelSpec(
    name="qwen-image.controlnet_union",
    family="qwen-image",
    model_class=QwenImageControlNetUnion,
    config_class=QwenImageControlNetUnionConfig,
    detect=detect_union_controlnet,
    formats={"diffusers": None},
    never_fp8=QwenImageControlNetUnion.ds_vram_never_fp8,
)
CONTROLNET_SPECS = (BLOCKWISE_CONTROLNET_SPEC, UNION_CONTROLNET_SPEC)
