"""Lazy recipes from the FLUX.1 checkpoint formats we read into our (BFL / transformers) key names.

Every target tensor is a rename, slice, concatenation, reshape or half-swap of source tensors (ds-loader
``Recipe``), evaluated per tensor when asked for, so ds-vram disk storage streams converted checkpoints too.
FP8 checkpoints (float8 e4m3fn weights, as in the ``flux1-dev-fp8`` repacks) are upcast per tensor to bfloat16,
which represents every e4m3fn value exactly; ``load_model(torch_dtype=...)`` or ds-vram then cast further.
"""

from __future__ import annotations

import re
from functools import cache

import torch

from ds_loader import Recipe, drop, fuse, rename, rule, strip_prefix, swap_halves
from ds_loader.recipes import (
    FP8_DTYPES,
    Expr,
    Key,
    KeyInfo,
    Reshape,
    Rule,
    Upcast,
)

__all__ = [
    "COMFY_DIT_PREFIX",
    "COMFY_VAE_PREFIXES",
    "FP8_DTYPES",
    "Upcast",
    "clip_inner_prefix",
    "clip_recipe",
    "dit_recipe",
    "t5_recipe",
    "vae_recipe",
]

COMFY_DIT_PREFIX = "model.diffusion_model."
# ComfyUI all-in-one checkpoints ("vae.") and Stable-Diffusion-style full checkpoints ("first_stage_model.").
COMFY_VAE_PREFIXES = ("vae.", "first_stage_model.")


def _upcast_all(prefix: str = "") -> Rule:
    """Keys under ``prefix`` (which is removed) as they are, FP8 ones upcast."""
    return rule(re.escape(prefix) + "(.*)", lambda m, _: {m.group(1): Upcast(Key(m.string))})


def _outside(prefixes: tuple[str, ...]) -> str:
    """A pattern matching every key that starts with none of ``prefixes``."""
    return "(?!" + "|".join(re.escape(p) for p in prefixes) + ").*"


# --- DiT ------------------------------------------------------------------------------------------------------

_T = r"transformer_blocks\.(?P<i>\d+)\."
_S = r"single_transformer_blocks\.(?P<i>\d+)\."
_P = r"\.(?P<p>weight|bias)"

# diffusers FluxTransformer2DModel -> BFL. Each rule is a full match, so "proj_out" below does not catch the
# single blocks' proj_out.
_DIFFUSERS_DIT_RULES = (
    rename(r"x_embedder" + _P, r"img_in.\g<p>"),
    rename(r"context_embedder" + _P, r"txt_in.\g<p>"),
    rename(r"time_text_embed\.timestep_embedder\.linear_1" + _P, r"time_in.in_layer.\g<p>"),
    rename(r"time_text_embed\.timestep_embedder\.linear_2" + _P, r"time_in.out_layer.\g<p>"),
    rename(r"time_text_embed\.text_embedder\.linear_1" + _P, r"vector_in.in_layer.\g<p>"),
    rename(r"time_text_embed\.text_embedder\.linear_2" + _P, r"vector_in.out_layer.\g<p>"),
    rename(r"time_text_embed\.guidance_embedder\.linear_1" + _P, r"guidance_in.in_layer.\g<p>"),
    rename(r"time_text_embed\.guidance_embedder\.linear_2" + _P, r"guidance_in.out_layer.\g<p>"),
    # diffusers' AdaLayerNormContinuous stores (scale, shift); BFL's final layer (shift, scale).
    swap_halves(r"norm_out\.linear" + _P, r"final_layer.adaLN_modulation.1.\g<p>"),
    rename(r"proj_out" + _P, r"final_layer.linear.\g<p>"),
    rename(_T + r"norm1\.linear" + _P, r"double_blocks.\g<i>.img_mod.lin.\g<p>"),
    rename(_T + r"norm1_context\.linear" + _P, r"double_blocks.\g<i>.txt_mod.lin.\g<p>"),
    fuse(_T + r"attn\.to_(?P<part>q|k|v)" + _P, r"double_blocks.\g<i>.img_attn.qkv.\g<p>", ["q", "k", "v"]),
    fuse(_T + r"attn\.add_(?P<part>q|k|v)_proj" + _P, r"double_blocks.\g<i>.txt_attn.qkv.\g<p>", ["q", "k", "v"]),
    rename(_T + r"attn\.norm_q\.weight", r"double_blocks.\g<i>.img_attn.norm.query_norm.scale"),
    rename(_T + r"attn\.norm_k\.weight", r"double_blocks.\g<i>.img_attn.norm.key_norm.scale"),
    rename(_T + r"attn\.norm_added_q\.weight", r"double_blocks.\g<i>.txt_attn.norm.query_norm.scale"),
    rename(_T + r"attn\.norm_added_k\.weight", r"double_blocks.\g<i>.txt_attn.norm.key_norm.scale"),
    rename(_T + r"attn\.to_out\.0" + _P, r"double_blocks.\g<i>.img_attn.proj.\g<p>"),
    rename(_T + r"attn\.to_add_out" + _P, r"double_blocks.\g<i>.txt_attn.proj.\g<p>"),
    rename(_T + r"ff\.net\.0\.proj" + _P, r"double_blocks.\g<i>.img_mlp.0.\g<p>"),
    rename(_T + r"ff\.net\.2" + _P, r"double_blocks.\g<i>.img_mlp.2.\g<p>"),
    rename(_T + r"ff_context\.net\.0\.proj" + _P, r"double_blocks.\g<i>.txt_mlp.0.\g<p>"),
    rename(_T + r"ff_context\.net\.2" + _P, r"double_blocks.\g<i>.txt_mlp.2.\g<p>"),
    rename(_S + r"norm\.linear" + _P, r"single_blocks.\g<i>.modulation.lin.\g<p>"),
    # BFL's linear1 computes q, k, v and the MLP input in one matmul.
    fuse(
        _S + r"(?P<part>attn\.to_q|attn\.to_k|attn\.to_v|proj_mlp)" + _P,
        r"single_blocks.\g<i>.linear1.\g<p>",
        ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    ),
    rename(_S + r"proj_out" + _P, r"single_blocks.\g<i>.linear2.\g<p>"),
    rename(_S + r"attn\.norm_q\.weight", r"single_blocks.\g<i>.norm.query_norm.scale"),
    rename(_S + r"attn\.norm_k\.weight", r"single_blocks.\g<i>.norm.key_norm.scale"),
)


def dit_recipe(fmt: str) -> Recipe | None:
    """The recipe of a DiT format: ``bfl`` (None), ``bfl-fp8``, ``comfyui``, ``comfyui-fp8`` or ``diffusers``."""
    if fmt == "bfl":
        return None
    if fmt == "bfl-fp8":
        return Recipe(_upcast_all())
    if fmt in ("comfyui", "comfyui-fp8"):
        # All-in-one ComfyUI files also hold the VAE and text encoders: keep only the diffusion model.
        keep = _upcast_all(COMFY_DIT_PREFIX) if fmt.endswith("fp8") else strip_prefix(COMFY_DIT_PREFIX)
        return Recipe(keep, drop(_outside((COMFY_DIT_PREFIX,))))
    if fmt == "diffusers":
        return Recipe(*_DIFFUSERS_DIT_RULES)
    raise ValueError(f"unknown FLUX.1 DiT format {fmt!r}")


# --- VAE ------------------------------------------------------------------------------------------------------


def _levels(keys: KeyInfo) -> int:
    """Resolution levels of a diffusers AutoencoderKL, probed from its encoder keys (headers only)."""
    levels = 0
    while f"encoder.down_blocks.{levels}.resnets.0.conv1.weight" in keys:
        levels += 1
    return levels


def _decoder_up(match: re.Match[str], keys: KeyInfo) -> dict[str, Expr]:
    # diffusers lists decoder levels from the lowest resolution; BFL indexes them like the encoder's.
    level = _levels(keys) - 1 - int(match.group("i"))
    rest = match.group("rest")
    rest = re.sub(r"^resnets\.", "block.", rest)
    rest = re.sub(r"^upsamplers\.0\.", "upsample.", rest)
    rest = rest.replace("conv_shortcut", "nin_shortcut")
    return {f"decoder.up.{level}.{rest}": Key(match.string)}


def _attention_weight(match: re.Match[str], keys: KeyInfo) -> dict[str, Expr]:
    # diffusers' mid-block attention projections are Linear (C, C); BFL's are 1x1 convs (C, C, 1, 1).
    target = f"{match.group('coder')}.mid.attn_1.{_ATTN_NAMES[match.group('name')]}.{match.group('p')}"
    shape = keys.info(match.string).shape
    if match.group("p") == "weight" and len(shape) == 2:
        return {target: Reshape(Key(match.string), (*shape, 1, 1))}
    return {target: Key(match.string)}


_ATTN_NAMES = {
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
    "group_norm": "norm",
}
_C = r"(?P<coder>encoder|decoder)\."

_DIFFUSERS_VAE_RULES = (
    rule(
        _C + r"mid_block\.attentions\.0\.(?P<name>to_q|to_k|to_v|to_out\.0|query|key|value|proj_attn|group_norm)"
        r"\.(?P<p>weight|bias)",
        _attention_weight,
    ),
    rename(_C + r"mid_block\.resnets\.0\.(?P<r>.*)", r"\g<coder>.mid.block_1.\g<r>"),
    rename(_C + r"mid_block\.resnets\.1\.(?P<r>.*)", r"\g<coder>.mid.block_2.\g<r>"),
    rename(
        r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.(.*)",
        r"encoder.down.\1.block.\2.nin_shortcut.\3",
    ),
    rename(r"encoder\.down_blocks\.(\d+)\.resnets\.(.*)", r"encoder.down.\1.block.\2"),
    rename(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", r"encoder.down.\1.downsample.\2"),
    rule(r"decoder\.up_blocks\.(?P<i>\d+)\.(?P<rest>.*)", _decoder_up),
    rename(_C + r"conv_norm_out\.(?P<r>.*)", r"\g<coder>.norm_out.\g<r>"),
)


def vae_recipe(fmt: str) -> Recipe | None:
    """The recipe of a VAE format: ``bfl`` (None), ``bfl-fp8``, ``diffusers``, ``comfyui`` (``vae.`` prefix) or
    ``sd`` (``first_stage_model.`` prefix)."""
    if fmt == "bfl":
        return None
    if fmt == "bfl-fp8":
        return Recipe(_upcast_all())
    if fmt in ("comfyui", "sd"):
        prefix = COMFY_VAE_PREFIXES[0] if fmt == "comfyui" else COMFY_VAE_PREFIXES[1]
        return Recipe(_upcast_all(prefix), drop(_outside((prefix,))))
    if fmt == "diffusers":
        return Recipe(*_DIFFUSERS_VAE_RULES)
    raise ValueError(f"unknown FLUX.1 VAE format {fmt!r}")


# --- T5 -------------------------------------------------------------------------------------------------------


_T5_EMBEDDING = r"shared\.weight|encoder\.embed_tokens\.weight"


def _t5_embedding(match: re.Match[str], keys: KeyInfo) -> dict[str, Expr]:
    # T5EncoderModel ties shared.weight and encoder.embed_tokens.weight; files hold one or both of them.
    prefix, name = match.group("prefix"), match.group("name")
    if name == "encoder.embed_tokens.weight" and f"{prefix}shared.weight" in keys:
        return {}
    source = Upcast(Key(match.string))
    return {"shared.weight": source, "encoder.embed_tokens.weight": source}


def t5_recipe(prefix: str = "") -> Recipe:
    """transformers ``T5EncoderModel`` files (optionally under ``prefix``, as ComfyUI's ``text_encoders.t5xxl.
    transformer.``), with the tied embedding provided under both names and FP8 tensors upcast."""
    rules = [rule(f"(?P<prefix>{re.escape(prefix)})(?P<name>{_T5_EMBEDDING})", _t5_embedding)]
    rules.append(drop(r"(.*\.)?decoder\..*|(.*\.)?lm_head\..*"))  # a full T5 (encoder-decoder) file
    rules.append(_upcast_all(prefix))
    if prefix:
        rules.append(drop(_outside((prefix,))))
    return Recipe(*rules)


@cache
def clip_inner_prefix() -> str:
    """Where the installed transformers puts ``CLIPTextModel``'s layers: ``"text_model."`` (files and transformers
    4) or ``""`` (transformers 5 flattened the class; its ``save_pretrained`` drops the prefix too)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(
            CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
        )
    return "text_model." if "text_model.embeddings.token_embedding.weight" in model.state_dict() else ""


def _clip_key(match: re.Match[str], _: KeyInfo) -> dict[str, Expr]:
    return {clip_inner_prefix() + match.group("rest"): Upcast(Key(match.string))}


def clip_recipe(prefix: str = "") -> Recipe:
    """transformers ``CLIPTextModel`` files (optionally under ``prefix``, as ComfyUI's ``text_encoders.clip_l.
    transformer.``), with or without the ``text_model.`` level, into the installed class's names; the
    ``position_ids`` buffer older versions saved (ours is rebuilt) and projection weights are dropped."""
    head = re.escape(prefix) + r"(?:text_model\.)?"
    rules = [
        drop(head + r"embeddings\.position_ids"),
        drop(re.escape(prefix) + r"(text_projection|logit_scale)(\.weight)?"),
        rule(head + r"(?P<rest>.*)", _clip_key),
    ]
    if prefix:
        rules.append(drop(_outside((prefix,))))
    return Recipe(*rules)
