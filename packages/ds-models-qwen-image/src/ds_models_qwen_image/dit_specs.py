"""Detection of the Qwen-Image DiT from key names and shapes, with its config inferred.

Formats (each also ``-fp8``: float8 weights upcast per tensor to bfloat16, exact for e4m3fn):

- ``official``: ``transformer/diffusion_pytorch_model-*.safetensors`` of every Qwen-Image release (diffusers'
  ``QwenImageTransformer2DModel`` names), and ComfyUI's repacks under ``diffusion_models/``, which keep those
  names; no conversion.
- ``prefixed``: the same names under ComfyUI's ``model.diffusion_model.`` (full checkpoints); the keys of the other
  components in such a file (VAE, text encoder) are dropped.

``zero_cond_t`` (Edit-2511) is not visible in the weights. It is read from ComfyUI's marker tensor
``__index_timestep_zero__`` (which Comfy-Org's Edit-2511 files carry, and which the recipes drop), else from a
diffusers ``config.json`` beside the weights, else False; a preset can still set it
(``QwenImageDiTConfig.edit_2511()``).
"""

from __future__ import annotations

import re
from typing import Any

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec, Recipe, drop, rule
from ds_loader.recipes import FP8_DTYPES, Key, Upcast
from ds_models_qwen_image.dit import QwenImageDiT, QwenImageDiTConfig

__all__ = ["COMFY_PREFIX", "DIT_FORMATS", "DIT_SPEC", "ZERO_COND_MARKER", "detect_dit", "dit_recipe", "rope_axes"]

COMFY_PREFIX = "model.diffusion_model."
ZERO_COND_MARKER = "__index_timestep_zero__"  # ComfyUI's flag for Edit-2511's zero_cond_t
DIT_FORMATS = ("official", "official-fp8", "prefixed", "prefixed-fp8")
_CONFIG_CLASS = "QwenImageTransformer2DModel"

# RoPE channels per axis are not in the weights: Qwen-Image uses (16, 56, 56) for 128-wide heads.
KNOWN_AXES = {128: (16, 56, 56), 32: (8, 12, 12)}  # 32: QwenImageDiTConfig.tiny()

_REQUIRED = (
    "img_in.weight",
    "txt_in.weight",
    "txt_norm.weight",
    "time_text_embed.timestep_embedder.linear_1.weight",
    "transformer_blocks.0.img_mod.1.weight",
    "transformer_blocks.0.attn.add_q_proj.weight",
    "transformer_blocks.0.attn.norm_added_q.weight",
    "transformer_blocks.0.img_mlp.net.0.proj.weight",
    "norm_out.linear.weight",
    "proj_out.weight",
)
_SCALED_FP8_SUFFIXES = (".scale_weight", ".weight_scale", ".input_scale", ".comfy_quant")


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes for a head width: the released split where known, else Qwen-Image's proportions (1/8 for frames,
    7/16 each for rows and columns), rounded to even numbers."""
    if head_dim in KNOWN_AXES:
        return KNOWN_AXES[head_dim]
    rest = max(2, head_dim * 7 // 16 // 2 * 2)
    return (head_dim - 2 * rest, rest, rest)


def _closeness(view: HeaderView) -> float:
    markers = ("transformer_blocks.", "img_mod.", "txt_mod.", "txt_norm.", "add_q_proj")
    keys = list(view.keys())
    return sum(any(m in k for m in markers) for k in keys) / max(len(keys), 1)


def _config_json(view: HeaderView) -> dict[str, Any]:
    """The diffusers config beside the weights, when it describes this model (not some other component's)."""
    json = view.config_json or {}
    return json if json.get("_class_name") == _CONFIG_CLASS or "zero_cond_t" in json else {}


def _dit_config(view: HeaderView, prefix: str) -> QwenImageDiTConfig | str:
    dim, in_channels = view.shape(prefix + "img_in.weight")
    joint = view.shape(prefix + "txt_in.weight")[1]
    head_dim = view.shape(prefix + "transformer_blocks.0.attn.norm_q.weight")[0]
    if dim % head_dim:
        return f"the model width {dim} is not a multiple of the head width {head_dim}"
    json = _config_json(view)
    patch = json.get("patch_size", 2)
    out_values = view.shape(prefix + "proj_out.weight")[0]
    if not isinstance(patch, int) or patch <= 0 or out_values % (patch * patch):
        return f"proj_out gives {out_values} values per token, not a multiple of patch_size**2 ({patch!r} squared)"
    axes = json.get("axes_dims_rope")
    zero_cond_t = prefix + ZERO_COND_MARKER in view or ZERO_COND_MARKER in view or bool(json.get("zero_cond_t"))
    try:
        return QwenImageDiTConfig(
            patch_size=patch,
            in_channels=in_channels,
            out_channels=out_values // (patch * patch),
            num_layers=view.count_blocks(prefix + "transformer_blocks."),
            attention_head_dim=head_dim,
            num_attention_heads=dim // head_dim,
            joint_attention_dim=joint,
            axes_dims_rope=tuple(axes) if isinstance(axes, list) else rope_axes(head_dim),
            zero_cond_t=zero_cond_t,
        )
    except ValueError as error:
        return str(error)


def detect_dit(view: HeaderView) -> Detection | Mismatch:
    """The Qwen-Image DiT in the official (diffusers) names, with or without ComfyUI's prefix, plain or FP8."""
    for prefix in ("", COMFY_PREFIX):
        if not all(prefix + key in view for key in _REQUIRED):
            continue
        if prefix + "time_text_embed.addition_t_embedding.weight" in view or any(
            _config_json(view).get(flag) for flag in ("use_additional_t_cond", "use_layer3d_rope")
        ):
            return Mismatch("Qwen-Image-Layered (addition_t_embedding, layer-3D RoPE) is not supported", 0.9)
        if any(key.endswith(_SCALED_FP8_SUFFIXES) for key in view):
            return Mismatch("scaled FP8 (weights with scale tensors) is not supported; use a plain or FP8 file", 0.9)
        config = _dit_config(view, prefix)
        if isinstance(config, str):
            return Mismatch(config, 0.8)
        fmt = "official" if not prefix else "prefixed"
        fp8 = any(view.info(key).dtype in FP8_DTYPES for key in view)
        return Detection(fmt + "-fp8" if fp8 else fmt, config)
    return Mismatch(
        "no img_in / txt_norm / transformer_blocks.0.img_mod.1 / attn.add_q_proj keys (Qwen-Image's DiT)",
        _closeness(view),
    )


def dit_recipe(fmt: str) -> Recipe:
    """The recipe of a DiT format (one of ``DIT_FORMATS``): drop the Edit-2511 marker, strip the prefix (dropping
    other components' keys), upcast FP8."""
    if fmt not in DIT_FORMATS:
        raise ValueError(f"unknown Qwen-Image DiT format {fmt!r}; choose one of {', '.join(DIT_FORMATS)}")
    upcast = fmt.endswith("-fp8")
    marker = drop("(?:" + re.escape(COMFY_PREFIX) + ")?" + ZERO_COND_MARKER)

    def keep(match, _keys) -> dict:
        return {match.group(1): Upcast(Key(match.string)) if upcast else Key(match.string)}

    if fmt.startswith("official"):
        return Recipe(marker, rule("(.*)", keep))
    return Recipe(marker, rule(re.escape(COMFY_PREFIX) + "(.*)", keep), drop(".*"))


DIT_SPEC = ModelSpec(
    name="qwen-image.dit",
    family="qwen-image",
    model_class=QwenImageDiT,
    config_class=QwenImageDiTConfig,
    detect=detect_dit,
    formats={fmt: dit_recipe(fmt) for fmt in DIT_FORMATS},
    never_fp8=QwenImageDiT.ds_vram_never_fp8,
)
