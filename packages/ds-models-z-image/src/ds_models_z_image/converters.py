"""Lazy recipes from the Z-Image DiT formats we read into the official (Tongyi-MAI / diffusers) key names.

Every target tensor is a rename, slice or dtype upcast of one source tensor (ds-loader ``Recipe``), evaluated per
tensor when asked for, so ds-vram disk storage streams converted checkpoints too. Formats:

- ``official``: ``transformer/*.safetensors`` of the Tongyi-MAI repositories (and diffusers'
  ``ZImageTransformer2DModel``, which keeps the same names): no conversion.
- ``prefixed``: the official names under ComfyUI's ``model.diffusion_model.`` (repacks by other frameworks, which
  DiffSynth-Studio's converter handles by stripping the prefix).
- ``comfyui``: ComfyUI's own layout (its Lumina-2 ``NextDiT`` names, with or without ``model.diffusion_model.``):
  fused ``attention.qkv``, ``attention.out``, ``q_norm``/``k_norm``, ``x_embedder``, ``final_layer``; as diffusers'
  ``convert_z_image_transformer_checkpoint_to_diffusers`` reads it.
- ``*-fp8``: the same with float8 weights, upcast per tensor to bfloat16 (exact for e4m3fn).
"""

from __future__ import annotations

import re

from ds_loader import Recipe, drop, rule
from ds_loader.recipes import (
    FP8_DTYPES,
    Expr,
    Key,
    KeyInfo,
    Slice,
    Upcast,
)

__all__ = ["COMFY_PREFIX", "FORMATS", "FP8_DTYPES", "Upcast", "dit_recipe"]

COMFY_PREFIX = "model.diffusion_model."
FORMATS = ("official", "official-fp8", "prefixed", "prefixed-fp8", "comfyui", "comfyui-fp8")


# ComfyUI (NextDiT) name -> official name, after the prefix; each a full match.
_COMFY_RENAMES = (
    (r"x_embedder\.(weight|bias)", r"all_x_embedder.2-1.\1"),
    (r"final_layer\.(.+)", r"all_final_layer.2-1.\1"),
    (r"(.+)\.attention\.out\.weight", r"\1.attention.to_out.0.weight"),
    (r"(.+)\.attention\.q_norm\.weight", r"\1.attention.norm_q.weight"),
    (r"(.+)\.attention\.k_norm\.weight", r"\1.attention.norm_k.weight"),
)
_COMFY_COMPILED = tuple((re.compile(pattern), replacement) for pattern, replacement in _COMFY_RENAMES)


def _comfy_target(name: str) -> str:
    for pattern, replacement in _COMFY_COMPILED:
        match = pattern.fullmatch(name)
        if match:
            return match.expand(replacement)
    return name


def _wrap(expr: Expr, upcast: bool) -> Expr:
    return Upcast(expr) if upcast else expr


_OPTIONAL_PREFIX = "(?:" + re.escape(COMFY_PREFIX) + ")?"


def _comfy_rule(upcast: bool):
    def fn(match: re.Match[str], keys: KeyInfo) -> dict[str, Expr]:
        name = match.group(1)
        qkv = re.fullmatch(r"(.+)\.attention\.qkv\.weight", name)
        if qkv is None:
            return {_comfy_target(name): _wrap(Key(match.string), upcast)}
        rows = keys.info(match.string).shape[0] // 3
        block = qkv.group(1)
        return {
            f"{block}.attention.to_{part}.weight": _wrap(Slice(Key(match.string), 0, i * rows, (i + 1) * rows), upcast)
            for i, part in enumerate("qkv")
        }

    return rule(_OPTIONAL_PREFIX + "(.*)", fn)


def _plain_rule(prefix: str, upcast: bool):
    return rule(re.escape(prefix) + "(.*)", lambda m, _: {m.group(1): _wrap(Key(m.string), upcast)})


def dit_recipe(fmt: str) -> Recipe | None:
    """The recipe of a DiT format (one of ``FORMATS``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown Z-Image DiT format {fmt!r}; choose one of {', '.join(FORMATS)}")
    upcast = fmt.endswith("-fp8")
    base = fmt.removesuffix("-fp8")
    if base == "official":
        return Recipe(_plain_rule("", True)) if upcast else None
    if base == "prefixed":
        return Recipe(_plain_rule(COMFY_PREFIX, upcast))
    # ComfyUI's NextDiT keeps a weightless final norm some exports write out; the official model has none.
    return Recipe(drop(_OPTIONAL_PREFIX + r"norm_final\.weight"), _comfy_rule(upcast))
