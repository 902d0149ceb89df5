"""Detection specs for Wan's text and image encoders (``wan.text_encoder``, ``wan.image_encoder``).

Each spec recognises its checkpoints from key names and shapes (headers only), infers the transformers config,
and names the format; ``text_encoder`` and ``image_encoder`` hold the lazy recipes. Formats:

- ``wan.text_encoder`` (``UMT5EncoderModel``): ``official`` (``models_t5_umt5-xxl-enc-bf16.pth``: ``token_embedding``,
  ``blocks.N.attn.q``, ``blocks.N.pos_embedding.embedding``, ``norm``) and ``transformers`` (diffusers
  ``text_encoder/``, sharded or not; also single files in transformers names). Every size comes from the shapes,
  the head count from the relative position bias ``(buckets, heads)``.
- ``wan.image_encoder`` (``CLIPVisionModel``): ``official`` (``models_clip_open-clip-xlm-roberta-large-vit-huge-14
  .pth``: ``visual.*``; the text tower is ignored) and ``transformers`` (diffusers ``image_encoder/``,
  ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection``). The head count is not in the shapes: it comes from
  ``config.json`` where there is one, else 80-wide heads (ViT-H/14: 16) or, for widths that are not a multiple
  of 80 (test sizes), 16-wide heads.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec, Recipe
from ds_models_wan.image_encoder import (
    build_clip_vision_model,
    clip_vision_config_from_shapes,
    clip_vision_transformers_recipe,
    wan_clip_recipe,
)
from ds_models_wan.text_encoder import (
    build_umt5_encoder,
    umt5_config_from_shapes,
    umt5_transformers_recipe,
    wan_t5_recipe,
)

__all__ = ["ENCODER_SPECS", "IMAGE_ENCODER_SPEC", "TEXT_ENCODER_SPEC", "detect_image_encoder", "detect_text_encoder"]


def _converted_shapes(view: HeaderView, recipe: Recipe, strip: str = "") -> dict[str, tuple[int, ...]]:
    """The shapes the model would receive through ``recipe`` (headers only), with ``strip`` removed from names."""
    return {k.removeprefix(strip): expr.info(view).shape for k, expr in recipe.plan(view).items()}


def _closeness(view: HeaderView, markers: tuple[str, ...]) -> float:
    keys = list(view.keys())
    return sum(any(k.startswith(m) for m in markers) for k in keys) / max(len(keys), 1)


# --- text encoder ----------------------------------------------------------------------------------------------

_T5_OFFICIAL = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.pos_embedding.embedding.weight")
_T5_BIAS = "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight"


def detect_text_encoder(view: HeaderView) -> Detection | Mismatch:
    """The umT5 encoder in the official ``.pth`` layout or in transformers names (diffusers ``text_encoder/``)."""
    if all(k in view for k in _T5_OFFICIAL):
        if "blocks.0.ffn.gate.0.weight" not in view or "norm.weight" not in view:
            return Mismatch("official T5 keys without blocks.0.ffn.gate.0 (gated GELU) or the final norm", 0.8)
        if view.count_blocks("blocks.") > 1 and "blocks.1.pos_embedding.embedding.weight" not in view:
            return Mismatch("one shared relative position bias: a T5 encoder, not umT5 (one bias per block)", 0.8)
        return Detection("official", umt5_config_from_shapes(_converted_shapes(view, wan_t5_recipe())))
    embedding = "shared.weight" in view or "encoder.embed_tokens.weight" in view
    if _T5_BIAS.format(0) in view and embedding:
        model_type = (view.config_json or {}).get("model_type")
        if model_type not in (None, "umt5") or (model_type is None and _T5_BIAS.format(1) not in view):
            return Mismatch("a T5 encoder (relative position bias in block 0 only), not umT5", 0.7)
        if "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" not in view:
            return Mismatch("its feed-forward is not gated (no wi_0): not Wan's umT5-XXL", 0.7)
        if "scaled_fp8" in view or any(k.endswith(".scale_weight") for k in view):
            return Mismatch("scaled FP8 (weights with scale_weight tensors) is not supported; use a plain file", 0.9)
        shapes = _converted_shapes(view, umt5_transformers_recipe())
        return Detection("transformers", umt5_config_from_shapes(shapes, view.config_json))
    return Mismatch(
        "no token_embedding + blocks.N.attn/pos_embedding (official) or shared + per-block "
        "encoder.block.N...relative_attention_bias (transformers UMT5)",
        _closeness(view, ("blocks.", "encoder.block.", "token_embedding", "shared")),
    )


# --- image encoder ---------------------------------------------------------------------------------------------

_CLIP_OFFICIAL = ("visual.patch_embedding.weight", "visual.pos_embedding", "visual.transformer.0.attn.to_qkv.weight")
_CLIP_TRANSFORMERS = ("embeddings.patch_embedding.weight", "embeddings.class_embedding", "pre_layrnorm.weight")


def detect_image_encoder(view: HeaderView) -> Detection | Mismatch:
    """The CLIP ViT vision tower in the official open-clip ``.pth`` layout or as a transformers
    ``CLIPVisionModel(WithProjection)`` (diffusers ``image_encoder/``)."""
    if all(k in view for k in _CLIP_OFFICIAL):
        if "visual.cls_embedding" not in view or "visual.pre_norm.weight" not in view:
            return Mismatch("an open-clip ViT without a class token or pre-norm: not Wan's ViT-H/14 layout", 0.8)
        shapes = _converted_shapes(view, wan_clip_recipe(), strip="vision_model.")
        return Detection("official", clip_vision_config_from_shapes(shapes))
    for inner in ("vision_model.", ""):
        if all(inner + k in view for k in _CLIP_TRANSFORMERS):
            if "text_model.embeddings.token_embedding.weight" in view:
                return Mismatch("a full CLIPModel (text and vision); pass the vision tower alone", 0.7)
            shapes = _converted_shapes(view, clip_vision_transformers_recipe(), strip="vision_model.")
            return Detection("transformers", clip_vision_config_from_shapes(shapes, view.config_json))
    return Mismatch(
        "no visual.patch_embedding/pos_embedding/transformer.N.attn.to_qkv (official open-clip) or "
        "[vision_model.]embeddings.class_embedding with pre_layrnorm (transformers CLIPVisionModel)",
        _closeness(view, ("visual.", "vision_model.")),
    )


TEXT_ENCODER_SPEC = ModelSpec(
    name="wan.text_encoder",
    family="wan",
    model_class=UMT5EncoderModel,
    config_class=UMT5Config,
    detect=detect_text_encoder,
    formats={"official": wan_t5_recipe(), "transformers": umt5_transformers_recipe()},
    build=build_umt5_encoder,
)
IMAGE_ENCODER_SPEC = ModelSpec(
    name="wan.image_encoder",
    family="wan",
    model_class=CLIPVisionModel,
    config_class=CLIPVisionConfig,
    detect=detect_image_encoder,
    formats={"official": wan_clip_recipe(), "transformers": clip_vision_transformers_recipe()},
    build=build_clip_vision_model,
)
ENCODER_SPECS = [TEXT_ENCODER_SPEC, IMAGE_ENCODER_SPEC]
