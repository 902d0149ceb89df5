"""Where diffusers-format FLUX.1 LoRA layers land in the BFL-named DiT.

diffusers splits layers that BFL fuses (q/k/v; a single block's q/k/v and MLP input) and stores the final
modulation halves the other way round. Each entry maps a diffusers module name to our layer, the part of
its output rows the LoRA covers, and how the layer's output rows divide into parts.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ds_loader.families import LoraTarget, PartSizes

__all__ = [
    "DIFFUSERS_LORA_TARGETS",
    "LoraTarget",
    "bfl_layer_from_flat",
    "diffusers_lora_names",
    "diffusers_lora_target",
]


def _equal_thirds(out_features: int, _in_features: int) -> list[int]:
    return [out_features // 3] * 3


def _single_linear1(out_features: int, in_features: int) -> list[int]:
    # linear1 computes q, k, v (hidden each; hidden = in_features) and the MLP input (the rest).
    return [in_features] * 3 + [out_features - 3 * in_features]


_D = r"transformer_blocks\.(?P<i>\d+)\."
_S = r"single_transformer_blocks\.(?P<i>\d+)\."
_QKV = {"q": 0, "k": 1, "v": 2}

# (pattern over the diffusers module name, our layer template, part index from the match or None, sizes, swap)
DIFFUSERS_LORA_TARGETS: tuple[tuple[str, str, Callable[[re.Match[str]], int] | None, PartSizes | None, bool], ...] = (
    (r"x_embedder", "img_in", None, None, False),
    (r"context_embedder", "txt_in", None, None, False),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", None, None, False),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", None, None, False),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", None, None, False),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", None, None, False),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", None, None, False),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", None, None, False),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", None, None, True),
    (r"proj_out", "final_layer.linear", None, None, False),
    (_D + r"norm1\.linear", "double_blocks.{i}.img_mod.lin", None, None, False),
    (_D + r"norm1_context\.linear", "double_blocks.{i}.txt_mod.lin", None, None, False),
    (
        _D + r"attn\.to_(?P<part>q|k|v)",
        "double_blocks.{i}.img_attn.qkv",
        lambda m: _QKV[m["part"]],
        _equal_thirds,
        False,
    ),
    (
        _D + r"attn\.add_(?P<part>q|k|v)_proj",
        "double_blocks.{i}.txt_attn.qkv",
        lambda m: _QKV[m["part"]],
        _equal_thirds,
        False,
    ),
    (_D + r"attn\.to_out\.0", "double_blocks.{i}.img_attn.proj", None, None, False),
    (_D + r"attn\.to_add_out", "double_blocks.{i}.txt_attn.proj", None, None, False),
    (_D + r"ff\.net\.0\.proj", "double_blocks.{i}.img_mlp.0", None, None, False),
    (_D + r"ff\.net\.2", "double_blocks.{i}.img_mlp.2", None, None, False),
    (_D + r"ff_context\.net\.0\.proj", "double_blocks.{i}.txt_mlp.0", None, None, False),
    (_D + r"ff_context\.net\.2", "double_blocks.{i}.txt_mlp.2", None, None, False),
    (_S + r"norm\.linear", "single_blocks.{i}.modulation.lin", None, None, False),
    (_S + r"attn\.to_(?P<part>q|k|v)", "single_blocks.{i}.linear1", lambda m: _QKV[m["part"]], _single_linear1, False),
    (_S + r"proj_mlp", "single_blocks.{i}.linear1", lambda m: 3, _single_linear1, False),
    (_S + r"proj_out", "single_blocks.{i}.linear2", None, None, False),
)
_COMPILED = [(re.compile(pattern), *rest) for pattern, *rest in DIFFUSERS_LORA_TARGETS]


def diffusers_lora_target(module_name: str) -> LoraTarget | None:
    """Our layer for a diffusers ``FluxTransformer2DModel`` module name (without ``transformer.``), or None."""
    for pattern, template, part, sizes, swap in _COMPILED:
        match = pattern.fullmatch(module_name)
        if match:
            layer = template.format(**match.groupdict())
            return LoraTarget(layer, None if part is None else part(match), sizes, swap)
    return None


# Our layer -> the diffusers module names that cover it (in part order); the inverse of DIFFUSERS_LORA_TARGETS.
_BFL_TO_DIFFUSERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"img_in", ("x_embedder",)),
    (r"txt_in", ("context_embedder",)),
    (r"time_in\.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    (r"time_in\.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    (r"vector_in\.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    (r"vector_in\.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    (r"guidance_in\.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    (r"guidance_in\.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    (r"final_layer\.adaLN_modulation\.1", ("norm_out.linear",)),
    (r"final_layer\.linear", ("proj_out",)),
    (r"double_blocks\.(?P<i>\d+)\.img_mod\.lin", ("transformer_blocks.{i}.norm1.linear",)),
    (r"double_blocks\.(?P<i>\d+)\.txt_mod\.lin", ("transformer_blocks.{i}.norm1_context.linear",)),
    (
        r"double_blocks\.(?P<i>\d+)\.img_attn\.qkv",
        tuple(f"transformer_blocks.{{i}}.attn.to_{p}" for p in "qkv"),
    ),
    (
        r"double_blocks\.(?P<i>\d+)\.txt_attn\.qkv",
        tuple(f"transformer_blocks.{{i}}.attn.add_{p}_proj" for p in "qkv"),
    ),
    (r"double_blocks\.(?P<i>\d+)\.img_attn\.proj", ("transformer_blocks.{i}.attn.to_out.0",)),
    (r"double_blocks\.(?P<i>\d+)\.txt_attn\.proj", ("transformer_blocks.{i}.attn.to_add_out",)),
    (r"double_blocks\.(?P<i>\d+)\.img_mlp\.0", ("transformer_blocks.{i}.ff.net.0.proj",)),
    (r"double_blocks\.(?P<i>\d+)\.img_mlp\.2", ("transformer_blocks.{i}.ff.net.2",)),
    (r"double_blocks\.(?P<i>\d+)\.txt_mlp\.0", ("transformer_blocks.{i}.ff_context.net.0.proj",)),
    (r"double_blocks\.(?P<i>\d+)\.txt_mlp\.2", ("transformer_blocks.{i}.ff_context.net.2",)),
    (r"single_blocks\.(?P<i>\d+)\.modulation\.lin", ("single_transformer_blocks.{i}.norm.linear",)),
    (
        r"single_blocks\.(?P<i>\d+)\.linear1",
        (*(f"single_transformer_blocks.{{i}}.attn.to_{p}" for p in "qkv"), "single_transformer_blocks.{i}.proj_mlp"),
    ),
    (r"single_blocks\.(?P<i>\d+)\.linear2", ("single_transformer_blocks.{i}.proj_out",)),
)
_BFL_COMPILED = [(re.compile(pattern), names) for pattern, names in _BFL_TO_DIFFUSERS]
# Flat (kohya) names: the same layers with dots as underscores, e.g. double_blocks_0_img_attn_qkv.
_FLAT_COMPILED = [(re.compile(pattern.replace(r"\.", "_")), pattern) for pattern, _ in _BFL_TO_DIFFUSERS]


def diffusers_lora_names(layer: str) -> list[str] | None:
    """The diffusers module names a LoRA on our ``layer`` is saved under (several for fused q/k/v), or None."""
    for pattern, names in _BFL_COMPILED:
        match = pattern.fullmatch(layer)
        if match:
            return [name.format(**match.groupdict()) for name in names]
    return None


def bfl_layer_from_flat(flat: str) -> str | None:
    """Our layer name for a kohya flat name without its ``lora_unet_`` prefix (``double_blocks_0_img_attn_qkv``)."""
    for flat_pattern, pattern in _FLAT_COMPILED:
        match = flat_pattern.fullmatch(flat)
        if match:
            template = pattern.replace(r"\.", ".").replace(r"(?P<i>\d+)", "{i}")
            return template.format(**match.groupdict())
    return None
