"""Lazy recipes from the Wan DiT checkpoint formats we read into the official Wan-AI key names.

Formats (the names ``specs.detect_dit`` returns):

- ``official``: Wan-AI's ``diffusion_pytorch_model*.safetensors`` (and ComfyUI's split ``diffusion_models/`` files,
  which keep the official names): no conversion.
- ``comfyui``: the same names under ``model.diffusion_model.`` (ComfyUI all-in-one files; other keys dropped).
- ``official-fp8`` / ``comfyui-fp8``: plain float8 weights (ComfyUI's ``*_fp8_e4m3fn`` repacks), upcast per tensor
  to bfloat16, which holds every e4m3fn/e5m2 value exactly. Scaled FP8 files (``scaled_fp8``, ``*.scale_weight``,
  ``*.weight_scale``) are refused by detection: their weights mean nothing without the scales.
- ``diffusers``: a ``WanTransformer3DModel`` folder (``transformer/``): renames, and splits of projections that
  ``fuse_projections`` joined (``to_qkv``, ``to_kv``, ``to_added_kv``) should a file hold them.

Every target tensor is a rename, slice or cast of one source tensor, evaluated when asked for, so ds-vram's disk
storage streams converted checkpoints too.
"""

from __future__ import annotations

import re

from ds_loader import Recipe, drop, rename, rule, split, strip_prefix
from ds_loader.recipes import FP8_DTYPES, Expr, Key, Rule, Upcast

__all__ = ["COMFY_DIT_PREFIX", "DIT_FORMATS", "FP8_DTYPES", "Upcast", "dit_recipe"]

COMFY_DIT_PREFIX = "model.diffusion_model."
DIT_FORMATS = ("official", "official-fp8", "comfyui", "comfyui-fp8", "diffusers")


def _upcast_all(prefix: str = "") -> Rule:
    """Keys under ``prefix`` (which is removed), FP8 ones upcast."""
    return rule(re.escape(prefix) + "(.*)", lambda m, _: {m.group(1): Upcast(Key(m.string))})


_B = r"blocks\.(?P<i>\d+)\."
_P = r"\.(?P<p>weight|bias)"
_ATTN = {"attn1": "self_attn", "attn2": "cross_attn"}
_PROJ = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o", "add_k_proj": "k_img", "add_v_proj": "v_img"}
_NORM = {"norm_q": "norm_q", "norm_k": "norm_k", "norm_added_k": "norm_k_img"}
_EMBEDDERS = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
}


def _alternatives(names: dict[str, str]) -> str:
    return "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True))


def _diffusers_rules() -> tuple[Rule, ...]:
    """diffusers ``WanTransformer3DModel`` -> official names (the inverse of diffusers' single-file converter,
    plus ``pos_embed`` -> ``img_emb.emb_pos``, which that converter does not map)."""

    def attn(m: re.Match[str], _: object) -> dict[str, Expr]:
        block, kind = m.group("i"), _ATTN[m.group("attn")]
        return {f"blocks.{block}.{kind}.{_PROJ[m.group('proj')]}.{m.group('p')}": Key(m.string)}

    def norm(m: re.Match[str], _: object) -> dict[str, Expr]:
        return {f"blocks.{m.group('i')}.{_ATTN[m.group('attn')]}.{_NORM[m.group('norm')]}.weight": Key(m.string)}

    def embedder(m: re.Match[str], _: object) -> dict[str, Expr]:
        return {f"{_EMBEDDERS[m.group('name')]}.{m.group('p')}": Key(m.string)}

    a = r"(?P<attn>attn1|attn2)\."
    return (
        rule(f"(?P<name>{_alternatives(_EMBEDDERS)})" + _P, embedder),
        rename(r"condition_embedder\.image_embedder\.pos_embed", "img_emb.emb_pos"),
        rename(r"scale_shift_table", "head.modulation"),
        rename(_B + r"scale_shift_table", r"blocks.\g<i>.modulation"),
        rule(_B + a + f"(?P<proj>{_alternatives(_PROJ)})" + _P, attn),
        rule(_B + a + f"(?P<norm>{_alternatives(_NORM)})" + r"\.weight", norm),
        drop(_B + r"attn2\.norm_added_q\.weight"),  # an unused norm some exports carry; diffusers ignores it too
        split(_B + r"attn1\.to_qkv" + _P, [rf"blocks.\g<i>.self_attn.{n}.\g<p>" for n in "qkv"]),
        split(_B + r"attn2\.to_kv" + _P, [rf"blocks.\g<i>.cross_attn.{n}.\g<p>" for n in "kv"]),
        split(_B + r"attn2\.to_added_kv" + _P, [rf"blocks.\g<i>.cross_attn.{n}_img.\g<p>" for n in "kv"]),
        rename(_B + r"norm2" + _P, r"blocks.\g<i>.norm3.\g<p>"),  # diffusers' norm2 is the affine cross-attn norm
        rename(_B + r"ffn\.net\.0\.proj" + _P, r"blocks.\g<i>.ffn.0.\g<p>"),
        rename(_B + r"ffn\.net\.2" + _P, r"blocks.\g<i>.ffn.2.\g<p>"),
    )


def dit_recipe(fmt: str) -> Recipe | None:
    """The recipe of a DiT format (one of ``DIT_FORMATS``); None for ``official`` (no conversion)."""
    if fmt == "official":
        return None
    if fmt == "official-fp8":
        return Recipe(_upcast_all())
    if fmt in ("comfyui", "comfyui-fp8"):
        # All-in-one ComfyUI files also hold the VAE and text encoders: keep only the diffusion model.
        keep = _upcast_all(COMFY_DIT_PREFIX) if fmt.endswith("fp8") else strip_prefix(COMFY_DIT_PREFIX)
        return Recipe(keep, drop(f"(?!{re.escape(COMFY_DIT_PREFIX)}).*"))
    if fmt == "diffusers":
        return Recipe(*_diffusers_rules())
    raise ValueError(f"unknown Wan DiT format {fmt!r}; choose one of {', '.join(DIT_FORMATS)}")
