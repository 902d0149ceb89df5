"""Detection specs for Z-Image, registered under ``ds.models``: the DiT and the Qwen3 text encoder.

Each spec recognises its checkpoints from key names and shapes only (never tensor data) and infers the config.
The VAE is FLUX.1's (``ds_models_flux.VAE_SPEC``, ``"flux.1.vae"``), which already reads the diffusers
``AutoencoderKL`` layout of ``vae/``; it is registered by ds-models-flux, not again here. Formats:

- DiT: ``official`` (``transformer/*.safetensors``, also diffusers' ``ZImageTransformer2DModel``), ``prefixed``
  (the same under ``model.diffusion_model.``), ``comfyui`` (ComfyUI's fused-qkv layout, prefix optional), each
  also ``-fp8``; see ``converters``.
- Omni-Base's SigLIP2 image encoder (``siglip/model.safetensors``): see ``image_encoder``.
- Text encoder: ``transformers`` (``Qwen3ForCausalLM`` keys ``model.*``, ``lm_head`` dropped) and ``qwen3-model``
  (``Qwen3Model`` keys without the prefix).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen3Config, Qwen3Model

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec, Recipe, drop, strip_prefix
from ds_models_z_image.controlnet import CONTROLNET_SPEC
from ds_models_z_image.converters import COMFY_PREFIX, FP8_DTYPES, dit_recipe
from ds_models_z_image.dit import ZImageDiT, ZImageDiTConfig
from ds_models_z_image.image_encoder import IMAGE_ENCODER_SPEC
from ds_models_z_image.text_encoder import qwen3_config_from_shapes

__all__ = [
    "DIT_SPEC",
    "SPECS",
    "TEXT_ENCODER_SPEC",
    "build_text_encoder_for_loader",
    "detect_dit",
    "detect_text_encoder",
]

# RoPE channels per position axis are not in the weights: Z-Image uses (32, 48, 48) for 128-wide heads.
KNOWN_AXES = {128: (32, 48, 48), 32: (8, 12, 12)}  # 32: ZImageDiTConfig.tiny()


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes for a head width: the released split where known, else Z-Image's proportions (1/4 for the
    caption/frame axis, 3/8 each for rows and columns), rounded to even numbers."""
    if head_dim in KNOWN_AXES:
        return KNOWN_AXES[head_dim]
    rest = max(2, head_dim * 3 // 8 // 2 * 2)
    return (head_dim - 2 * rest, rest, rest)


def _closeness(view: HeaderView, markers: tuple[str, ...]) -> float:
    keys = list(view.keys())
    return sum(any(m in k for m in markers) for k in keys) / max(len(keys), 1)


def _has_fp8(view: HeaderView) -> bool:
    return any(view.info(key).dtype in FP8_DTYPES for key in view)


# --- DiT ------------------------------------------------------------------------------------------------------

_OFFICIAL = {
    "x": "all_x_embedder.2-1.weight",
    "q_norm": "layers.0.attention.norm_q.weight",
    "qkv": "layers.0.attention.to_q.weight",
}
_COMFY = {
    "x": "x_embedder.weight",
    "q_norm": "layers.0.attention.q_norm.weight",
    "qkv": "layers.0.attention.qkv.weight",
}


def _dit_config(view: HeaderView, prefix: str, names: dict[str, str]) -> ZImageDiTConfig | str:
    dim, patch_dim = view.shape(prefix + names["x"])
    head_dim = view.shape(prefix + names["q_norm"])[0]
    if dim % head_dim:
        return f"the model width {dim} is not a multiple of the head width {head_dim}"
    fields: dict[str, Any] = {}
    json = view.config_json or {}
    for name in ("rope_theta", "t_scale", "norm_eps"):
        if isinstance(json.get(name), (int, float)):
            fields[name] = float(json[name])
    for name in ("axes_dims", "axes_lens"):
        if isinstance(json.get(name), list):
            fields[name] = tuple(json[name])
    fields.setdefault("axes_dims", rope_axes(head_dim))
    siglip = prefix + "siglip_embedder.1.weight"
    try:
        return ZImageDiTConfig(
            in_channels=patch_dim // 4,
            dim=dim,
            n_layers=view.count_blocks(prefix + "layers."),
            n_refiner_layers=view.count_blocks(prefix + "noise_refiner."),
            n_heads=dim // head_dim,
            cap_feat_dim=view.shape(prefix + "cap_embedder.1.weight")[1],
            siglip_feat_dim=view.shape(siglip)[1] if siglip in view else None,
            **fields,
        )
    except ValueError as error:
        return str(error)


def detect_dit(view: HeaderView) -> Detection | Mismatch:
    """The Z-Image DiT in the official (diffusers) layout, with or without ComfyUI's prefix, or ComfyUI's fused-qkv
    layout, plain or FP8, with its config inferred from shapes."""
    for prefix in ("", COMFY_PREFIX):
        # Z-Image modulates from a bare Linear (adaLN_modulation.0) on a 256-d (or narrower) timestep embedding;
        # Lumina-2, which shares the NextDiT names, has SiLU first (adaLN_modulation.1).
        if not all(prefix + key in view for key in ("cap_pad_token", "x_pad_token", "cap_embedder.1.weight")):
            continue
        if prefix + "layers.0.adaLN_modulation.0.weight" not in view:
            return Mismatch("NextDiT keys without layers.0.adaLN_modulation.0 (Lumina-2, not Z-Image)", 0.7)
        if prefix + _OFFICIAL["x"] in view and prefix + _OFFICIAL["qkv"] in view:
            names, fmt = _OFFICIAL, ("official" if not prefix else "prefixed")
        elif prefix + _COMFY["x"] in view and prefix + _COMFY["qkv"] in view:
            names, fmt = _COMFY, "comfyui"
        else:
            return Mismatch("Z-Image pad tokens but neither all_x_embedder.2-1 with to_q nor x_embedder with qkv", 0.8)
        if any(key.endswith(".scale_weight") for key in view):
            return Mismatch("scaled FP8 (weights with scale_weight tensors) is not supported; use a plain one", 0.9)
        config = _dit_config(view, prefix, names)
        if isinstance(config, str):
            return Mismatch(config, 0.8)
        return Detection(fmt + "-fp8" if _has_fp8(view) else fmt, config)
    markers = ("noise_refiner.", "context_refiner.", "cap_pad_token", "all_x_embedder.")
    return Mismatch("no cap_pad_token / x_pad_token / cap_embedder (Z-Image's DiT)", _closeness(view, markers))


# --- text encoder -----------------------------------------------------------------------------------------------

_QWEN3_KEYS = (
    "embed_tokens.weight",
    "layers.0.self_attn.q_norm.weight",
    "layers.0.mlp.gate_proj.weight",
    "norm.weight",
)


def detect_text_encoder(view: HeaderView) -> Detection | Mismatch:
    """A transformers Qwen3 decoder (``Qwen3ForCausalLM`` with ``model.`` keys, or ``Qwen3Model`` without); the LM
    head, if any, is dropped."""
    for prefix, fmt in (("model.", "transformers"), ("", "qwen3-model")):
        if not all(prefix + key in view for key in _QWEN3_KEYS):
            continue
        if any(key.startswith(prefix + "visual.") or key.startswith("visual.") for key in view):
            return Mismatch("it has a vision tower (Qwen-VL), not the Qwen3 text model", 0.7)
        shapes = {key[len(prefix) :]: view.shape(key) for key in view if key.startswith(prefix)}
        json = view.config_json if (view.config_json or {}).get("model_type") == "qwen3" else None
        return Detection(fmt, qwen3_config_from_shapes(shapes, json))
    return Mismatch("no Qwen3 embed_tokens with per-head q_norm", _closeness(view, ("self_attn.q_norm",)))


def build_text_encoder_for_loader(config: Qwen3Config) -> Qwen3Model:
    """A ``Qwen3Model`` for the loader (built under the meta device).

    Its rotary ``inv_freq`` buffers are not saved in checkpoints, so they are computed here, on the CPU, where the
    loader and ds-vram find them.
    """
    model = Qwen3Model(config)
    with torch.device("cpu"):
        model.rotary_emb = type(model.rotary_emb)(config=config)
    return model.eval()


_TEXT_ENCODER_RECIPE = Recipe(drop(r"lm_head\.weight"), strip_prefix("model."))

DIT_SPEC = ModelSpec(
    name="z-image.dit",
    family="z-image",
    model_class=ZImageDiT,
    config_class=ZImageDiTConfig,
    detect=detect_dit,
    formats={
        fmt: dit_recipe(fmt)
        for fmt in ("official", "official-fp8", "prefixed", "prefixed-fp8", "comfyui", "comfyui-fp8")
    },
    never_fp8=ZImageDiT.ds_vram_never_fp8,
)
TEXT_ENCODER_SPEC = ModelSpec(
    name="z-image.text_encoder",
    family="z-image",
    model_class=Qwen3Model,
    config_class=Qwen3Config,
    detect=detect_text_encoder,
    formats={"transformers": _TEXT_ENCODER_RECIPE, "qwen3-model": Recipe(drop(r"lm_head\.weight"))},
    build=build_text_encoder_for_loader,
)
SPECS = (DIT_SPEC, TEXT_ENCODER_SPEC, CONTROLNET_SPEC, IMAGE_ENCODER_SPEC)
