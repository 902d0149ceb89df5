"""Detection specs for Wan, registered under the ``ds.models`` entry point: the DiT here (``wan.dit``), the VAEs
(``vae_specs``) and the encoders (``encoder_specs``).

The DiT spec recognises a checkpoint from key names and shapes only, infers the ``WanDiTConfig`` (width, depth,
channels, image input, FLF2V position embedding, TI2V) and names the format (see ``converters``). The head count is
not in the shapes: it comes from a ``config.json`` beside the weights when there is one (official ``num_heads``,
diffusers ``num_attention_heads``), else from 128-wide heads (every release) or, for widths that are not a multiple
of 128 (test sizes), 16-wide heads.
"""

from __future__ import annotations

import math
from typing import Any

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec
from ds_models_wan.converters import COMFY_DIT_PREFIX, DIT_FORMATS, FP8_DTYPES, dit_recipe
from ds_models_wan.dit import WanDiT, WanDiTConfig
from ds_models_wan.encoder_specs import ENCODER_SPECS
from ds_models_wan.vae_specs import VAE_SPECS

__all__ = ["DIT_SPEC", "DIT_SPECS", "SPECS", "detect_dit", "dit_config_from_shapes"]

HEAD_DIM = 128  # every release
TINY_HEAD_DIM = 16  # WanDiTConfig tiny presets
TI2V_CHANNELS = 48  # the Wan 2.2 VAE's z_dim: TI2V-5B reads and writes 48 latent channels
OFFICIAL_TOPS = ("patch_embedding", "text_embedding", "time_embedding", "time_projection", "blocks", "head", "img_emb")
_CORE = (
    "patch_embedding.weight",
    "text_embedding.0.weight",
    "time_embedding.0.weight",
    "time_projection.1.weight",
    "head.head.weight",
    "head.modulation",
)
_DIFFUSERS_CORE = ("patch_embedding.weight", "condition_embedder.time_proj.weight", "proj_out.weight")


def _json_fields(config_json: dict[str, Any] | None) -> dict[str, Any]:
    """What a ``config.json`` adds to the shapes: heads, text length and eps (the model type comes from the
    weights: image inputs, FLF2V positions, and in/out channels)."""
    if not config_json:
        return {}
    fields: dict[str, Any] = {}
    heads = config_json.get("num_heads", config_json.get("num_attention_heads"))
    if isinstance(heads, int) and heads > 0:
        fields["num_heads"] = heads
    if isinstance(config_json.get("text_len"), int):
        fields["text_len"] = config_json["text_len"]
    if isinstance(config_json.get("eps"), (int, float)):
        fields["eps"] = float(config_json["eps"])
    return fields


def dit_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], config_json: dict[str, Any] | None = None
) -> WanDiTConfig:
    """A ``WanDiTConfig`` from the shapes of a checkpoint in the official names."""
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    image = "img_emb.proj.1.weight" in shapes
    pos = shapes.get("img_emb.emb_pos")
    out_dim = shapes["head.head.weight"][0] // math.prod(patch)
    if pos is not None:
        model_type = "flf2v"
    elif image or in_dim > out_dim:
        model_type = "i2v"
    else:
        model_type = "ti2v" if in_dim == out_dim == TI2V_CHANNELS else "t2v"
    fields: dict[str, Any] = {
        "model_type": model_type,
        "num_heads": dim // HEAD_DIM if dim % HEAD_DIM == 0 else max(1, dim // TINY_HEAD_DIM),
        **_json_fields(config_json),
    }
    if image:
        fields["clip_dim"] = shapes["img_emb.proj.0.weight"][0]
    if pos is not None:
        fields["clip_tokens"] = pos[1] // 2
    return WanDiTConfig(
        patch_size=tuple(patch),
        in_dim=in_dim,
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0] if "blocks.0.ffn.0.weight" in shapes else 4 * dim,
        freq_dim=shapes["time_embedding.0.weight"][1],
        text_dim=shapes["text_embedding.0.weight"][1],
        out_dim=out_dim,
        num_layers=1 + max((int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")), default=-1),
        qk_norm="blocks.0.self_attn.norm_q.weight" in shapes or "blocks.0.self_attn.q.weight" not in shapes,
        cross_attn_norm="blocks.0.norm3.weight" in shapes or "blocks.0.self_attn.q.weight" not in shapes,
        has_image_input=image,
        has_image_position_embedding=pos is not None,
        **fields,
    )


def _closeness(view: HeaderView) -> float:
    markers = ("blocks.", "condition_embedder.", "patch_embedding", COMFY_DIT_PREFIX + "blocks.")
    return sum(k.startswith(markers) for k in view) / max(len(view), 1)


def _layout(view: HeaderView) -> tuple[str, str] | None:
    """(format, prefix) of the layout the keys are in, before FP8 is considered."""
    for prefix, fmt in (("", "official"), (COMFY_DIT_PREFIX, "comfyui")):
        if all(prefix + k in view for k in _CORE):
            return fmt, prefix
    if all(k in view for k in _DIFFUSERS_CORE):
        return "diffusers", ""
    return None


def detect_dit(view: HeaderView) -> Detection | Mismatch:
    """The Wan DiT in the official, ComfyUI (plain or FP8) or diffusers layout, with its config from the shapes."""
    found = _layout(view)
    if found is None:
        return Mismatch(
            "no patch_embedding/text_embedding/time_projection/head.head (official Wan) or "
            "condition_embedder.time_proj/proj_out (diffusers WanTransformer3DModel)",
            _closeness(view),
        )
    fmt, prefix = found
    if "scaled_fp8" in view or any(k.endswith((".scale_weight", ".weight_scale")) for k in view):
        return Mismatch(
            "scaled FP8 (weights with scale_weight/weight_scale tensors) is not supported; use a plain file", 0.9
        )
    if fmt != "diffusers" and any(view.info(k).dtype in FP8_DTYPES for k in view if k.startswith(prefix)):
        fmt += "-fp8"
    recipe = dit_recipe(fmt)
    shapes = (
        {k: view.shape(k) for k in view}
        if recipe is None
        else {k: expr.info(view).shape for k, expr in recipe.plan(view).items()}
    )
    extra = sorted({k.split(".", 1)[0] for k in shapes} - set(OFFICIAL_TOPS))
    if extra:
        return Mismatch(
            f"it has modules the Wan DiT lacks ({', '.join(extra[:5])}): a VACE, S2V, Animate or Fun variant, "
            "which is not supported",
            0.8,
        )
    try:
        config = dit_config_from_shapes(shapes, view.config_json)
    except (KeyError, ValueError) as error:
        return Mismatch(f"its shapes do not make a Wan DiT config: {error}", 0.7)
    return Detection(fmt, config)


DIT_SPEC = ModelSpec(
    name="wan.dit",
    family="wan",
    model_class=WanDiT,
    config_class=WanDiTConfig,
    detect=detect_dit,
    formats={fmt: dit_recipe(fmt) for fmt in DIT_FORMATS},
    never_fp8=WanDiT.ds_vram_never_fp8,
)
DIT_SPECS = [DIT_SPEC]
SPECS = [*DIT_SPECS, *VAE_SPECS, *ENCODER_SPECS]
