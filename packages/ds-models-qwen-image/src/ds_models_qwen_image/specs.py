"""Detection specs for Qwen-Image, registered under ``ds.models``: the DiT (``dit_specs``), the ControlNets
(``controlnet``) and the Qwen2.5-VL text encoder (here).

Each spec recognises its checkpoints from key names and shapes only (never tensor data) and infers the config.
The VAE is the Wan 2.1 VAE: ds-models-wan's ``"wan.vae"`` spec reads the diffusers ``AutoencoderKLQwenImage``
folder (``vae/``), with its latent statistics from ``config.json``; it is registered by ds-models-wan, not again here.
Text encoder formats: see ``converters``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec
from ds_models_qwen_image.controlnet import CONTROLNET_SPECS
from ds_models_qwen_image.converters import TEXT_ENCODER_FORMATS, text_encoder_recipe
from ds_models_qwen_image.dit_specs import DIT_SPEC
from ds_models_qwen_image.text_encoder import build_text_encoder_for_loader, qwen25vl_7b_config

__all__ = [
    "CONTROLNET_SPECS",
    "DIT_SPEC",
    "SPECS",
    "TEXT_ENCODER_SPEC",
    "detect_text_encoder",
    "qwen25vl_config_from_shapes",
]

# (language model prefix, vision prefix) of each layout
_LAYOUTS = {
    "transformers": ("model.language_model.", "model.visual."),
    "transformers-legacy": ("model.", "visual."),
    "qwen2_5_vl-model": ("language_model.", "visual."),
}
_TEXT_KEYS = (
    "embed_tokens.weight",
    "layers.0.self_attn.q_proj.weight",
    "layers.0.mlp.gate_proj.weight",
    "norm.weight",
)
_VISION_KEYS = ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "merger.mlp.2.weight")
TEXT_HEAD_DIM = 128  # every Qwen2.5-VL size (3B, 7B, 32B, 72B)
VISION_HEAD_DIM = 80  # 1280 / 16


def _count(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    return 1 + max(int(key[len(prefix) :].split(".", 1)[0]) for key in shapes if key.startswith(prefix))


def qwen25vl_config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], config_json: Mapping[str, Any] | None = None
) -> Qwen2_5_VLConfig:
    """A ``Qwen2_5_VLConfig`` from ``Qwen2_5_VLModel`` key shapes (``language_model.*``, ``visual.*``).

    Sizes come from the shapes; head counts, RoPE, window layout and token ids (what the weights do not show) from
    ``config_json`` when given (a ``qwen2_5_vl`` ``config.json``, flat as transformers 4 saved it or nested as 5
    does), else from Qwen2.5-VL-7B with its head widths (128 text, 80 vision).
    """
    base = Qwen2_5_VLConfig(**config_json) if config_json else qwen25vl_7b_config()
    text, vision = base.text_config.to_dict(), base.vision_config.to_dict()
    vocab, hidden = shapes["language_model.embed_tokens.weight"]
    heads = text["num_attention_heads"] if config_json else hidden // TEXT_HEAD_DIM
    head_dim = hidden // heads
    text.update(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["language_model.layers.0.mlp.gate_proj.weight"][0],
        num_hidden_layers=_count(shapes, "language_model.layers."),
        num_attention_heads=heads,
        num_key_value_heads=shapes["language_model.layers.0.self_attn.k_proj.weight"][0] // head_dim,
    )
    text.pop("layer_types", None)  # recomputed for the layer count
    patch = shapes["visual.patch_embed.proj.weight"]  # (width, 3, temporal patch, patch, patch)
    vision.update(
        depth=_count(shapes, "visual.blocks."),
        hidden_size=patch[0],
        in_channels=patch[1],
        temporal_patch_size=patch[2],
        patch_size=patch[3],
        intermediate_size=shapes["visual.blocks.0.mlp.gate_proj.weight"][0],
        out_hidden_size=shapes["visual.merger.mlp.2.weight"][0],
        num_heads=vision["num_heads"] if config_json else patch[0] // VISION_HEAD_DIM,
    )
    tokens = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        **{name: getattr(base, name) for name in tokens},
    )


def detect_text_encoder(view: HeaderView) -> Detection | Mismatch:
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration`` in the current or the older transformers layout, or a bare
    ``Qwen2_5_VLModel``), with its config from shapes and ``config.json``; the LM head, if any, is dropped."""
    for fmt in TEXT_ENCODER_FORMATS:
        text, vision = _LAYOUTS[fmt]
        if not all(text + key in view for key in _TEXT_KEYS):
            continue
        if not all(vision + key in view for key in _VISION_KEYS):
            return Mismatch("a Qwen2 language model without the Qwen2.5-VL vision tower (visual.*)", 0.7)
        shapes = {}
        for key in view:
            if key.startswith(text):
                shapes["language_model." + key[len(text) :]] = view.shape(key)
            elif key.startswith(vision):
                shapes["visual." + key[len(vision) :]] = view.shape(key)
        json = view.config_json if (view.config_json or {}).get("model_type") == "qwen2_5_vl" else None
        try:
            return Detection(fmt, qwen25vl_config_from_shapes(shapes, json))
        except (KeyError, ValueError) as error:
            return Mismatch(f"Qwen2.5-VL keys, but their shapes give no valid config: {error}", 0.8)
    closeness = sum(".visual." in key or key.startswith("visual.") for key in view) / max(len(view), 1)
    return Mismatch("no Qwen2.5-VL language model (embed_tokens, layers.N) beside a visual.* tower", closeness)


TEXT_ENCODER_SPEC = ModelSpec(
    name="qwen-image.text_encoder",
    family="qwen-image",
    model_class=Qwen2_5_VLModel,
    config_class=Qwen2_5_VLConfig,
    detect=detect_text_encoder,
    formats={fmt: text_encoder_recipe(fmt) for fmt in TEXT_ENCODER_FORMATS},
    build=build_text_encoder_for_loader,
)

SPECS: tuple[ModelSpec, ...] = (DIT_SPEC, TEXT_ENCODER_SPEC, *CONTROLNET_SPECS)
