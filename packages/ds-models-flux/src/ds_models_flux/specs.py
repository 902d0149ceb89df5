"""Detection specs for FLUX.1: the DiT, the VAE and the two text encoders, registered under ``ds.models``.

Each spec recognises its checkpoints from key names and shapes only (never tensor data), infers the config, and
names the format; ``converters`` holds the lazy recipes. Formats:

- DiT: ``bfl`` (``flux1-dev.safetensors``), ``comfyui`` (``model.diffusion_model.`` prefix, all-in-one files
  too), ``bfl-fp8`` / ``comfyui-fp8`` (float8 weights, upcast per tensor), ``diffusers``
  (``FluxTransformer2DModel``).
- VAE: ``bfl`` (``ae.safetensors``), ``bfl-fp8``, ``comfyui`` (``vae.``), ``sd`` (``first_stage_model.``),
  ``diffusers`` (``AutoencoderKL``).
- CLIP and T5: ``transformers`` (``text_encoder/``, ``text_encoder_2/`` with shards) and ``comfyui``
  (``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``).
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec
from ds_models_flux.converters import (
    COMFY_DIT_PREFIX,
    FP8_DTYPES,
    clip_recipe,
    dit_recipe,
    t5_recipe,
    vae_recipe,
)
from ds_models_flux.dit import FluxDiT, FluxDiTConfig
from ds_models_flux.text_encoders import (
    build_clip_text_model,
    build_t5_encoder,
    clip_config_from_shapes,
    t5_config_from_shapes,
)
from ds_models_flux.vae import FluxVAE, FluxVAEConfig

__all__ = [
    "CLIP_SPEC",
    "DIT_SPEC",
    "SPECS",
    "T5_SPEC",
    "VAE_SPEC",
    "detect_clip",
    "detect_dit",
    "detect_t5",
    "detect_vae",
    "rope_axes",
]

# RoPE channels per position axis are not in the weights; FLUX.1 uses (16, 56, 56) for 128-wide heads.
KNOWN_AXES = {128: (16, 56, 56), 32: (8, 12, 12)}  # 32: FluxDiTConfig.tiny()
CLIP_COMFY_PREFIX = "text_encoders.clip_l.transformer."
T5_COMFY_PREFIX = "text_encoders.t5xxl.transformer."


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """RoPE axes for a head width: the released split where known, else FLUX's proportions (1/8 for the
    reference-image axis, the rest split evenly between rows and columns), rounded to even numbers."""
    if head_dim in KNOWN_AXES:
        return KNOWN_AXES[head_dim]
    first = max(2, head_dim // 8 // 2 * 2)
    rest = (head_dim - first) // 2 // 2 * 2
    return (head_dim - 2 * rest, rest, rest)


def _has_fp8(view: HeaderView, prefix: str = "") -> bool:
    return any(view.info(k).dtype in FP8_DTYPES for k in view if k.startswith(prefix))


def _closeness(view: HeaderView, markers: tuple[str, ...]) -> float:
    keys = list(view.keys())
    return sum(any(m in k for m in markers) for k in keys) / max(len(keys), 1)


# --- DiT ------------------------------------------------------------------------------------------------------


def _dit_config(view: HeaderView, names: dict[str, str], prefix: str, axes: Any = None) -> FluxDiTConfig | str:
    """Our config from the shapes; ``names`` maps our role names to the format's key names (after ``prefix``)."""
    hidden, in_channels = view.shape(prefix + names["img_in"])
    depth = view.count_blocks(prefix + names["double"])
    single = view.count_blocks(prefix + names["single"])
    norm = names["double_norm"] if depth else names["single_norm"]
    if not depth and not single:
        return "it has no double or single blocks"
    head_dim = view.shape(prefix + norm)[0]
    if depth:
        mlp_hidden = view.shape(prefix + names["mlp"])[0]
    else:
        # BFL's linear1 also holds q, k and v; diffusers' proj_mlp is the MLP input alone
        fused = names["linear1"].endswith("linear1.weight")
        mlp_hidden = view.shape(prefix + names["linear1"])[0] - (3 * hidden if fused else 0)
    return FluxDiTConfig(
        in_channels=in_channels,
        out_channels=view.shape(prefix + names["final"])[0],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=single,
        mlp_ratio=mlp_hidden / hidden,
        context_in_dim=view.shape(prefix + names["txt_in"])[1],
        vec_in_dim=view.shape(prefix + names["vector_in"])[1],
        axes_dim=tuple(axes) if axes else rope_axes(head_dim),
        qkv_bias=not depth or prefix + names["qkv_bias"] in view,
        guidance_embed=prefix + names["guidance"] in view,
    )


_BFL_NAMES = {
    "img_in": "img_in.weight",
    "txt_in": "txt_in.weight",
    "vector_in": "vector_in.in_layer.weight",
    "time_in": "time_in.in_layer.weight",
    "guidance": "guidance_in.in_layer.weight",
    "final": "final_layer.linear.weight",
    "double": "double_blocks.",
    "single": "single_blocks.",
    "double_norm": "double_blocks.0.img_attn.norm.query_norm.scale",
    "single_norm": "single_blocks.0.norm.query_norm.scale",
    "mlp": "double_blocks.0.img_mlp.0.weight",
    "linear1": "single_blocks.0.linear1.weight",
    "qkv_bias": "double_blocks.0.img_attn.qkv.bias",
    "modulation": "double_blocks.0.img_mod.lin.weight",
}
_DIFFUSERS_NAMES = {
    "img_in": "x_embedder.weight",
    "txt_in": "context_embedder.weight",
    "vector_in": "time_text_embed.text_embedder.linear_1.weight",
    "time_in": "time_text_embed.timestep_embedder.linear_1.weight",
    "guidance": "time_text_embed.guidance_embedder.linear_1.weight",
    "final": "proj_out.weight",
    "double": "transformer_blocks.",
    "single": "single_transformer_blocks.",
    "double_norm": "transformer_blocks.0.attn.norm_q.weight",
    "single_norm": "single_transformer_blocks.0.attn.norm_q.weight",
    "mlp": "transformer_blocks.0.ff.net.0.proj.weight",
    "linear1": "single_transformer_blocks.0.proj_mlp.weight",
    "qkv_bias": "transformer_blocks.0.attn.to_q.bias",
    "modulation": "transformer_blocks.0.norm1.linear.weight",
}
_REQUIRED = ("img_in", "txt_in", "vector_in", "time_in", "final")


def _is_layout(view: HeaderView, names: dict[str, str], prefix: str) -> bool:
    if not all(prefix + names[role] in view for role in _REQUIRED):
        return False
    # FLUX.2 and Chroma share the embedders' names but modulate from shared layers, not per block.
    return not view.count_blocks(prefix + names["double"]) or prefix + names["modulation"] in view


def detect_dit(view: HeaderView) -> Detection | Mismatch:
    """The FLUX.1 DiT in BFL, ComfyUI, FP8 or diffusers layout, with its config inferred from shapes."""
    for prefix, fmt in (("", "bfl"), (COMFY_DIT_PREFIX, "comfyui")):
        if _is_layout(view, _BFL_NAMES, prefix):
            if any(k.endswith(".scale_weight") for k in view) or "scaled_fp8" in view:
                return Mismatch(
                    "scaled FP8 (weights with scale_weight tensors) is not supported; use a plain one", 0.9
                )
            config = _dit_config(view, _BFL_NAMES, prefix)
            if isinstance(config, str):
                return Mismatch(config, 0.8)
            return Detection(fmt + "-fp8" if _has_fp8(view, prefix) else fmt, config)
    if _is_layout(view, _DIFFUSERS_NAMES, ""):
        if "transformer_blocks.0.attn.to_q.weight" not in view and view.count_blocks("transformer_blocks."):
            return Mismatch("diffusers keys without separate to_q/to_k/to_v (not FluxTransformer2DModel)", 0.8)
        axes = (view.config_json or {}).get("axes_dims_rope")
        config = _dit_config(view, _DIFFUSERS_NAMES, "", axes)
        if isinstance(config, str):
            return Mismatch(config, 0.8)
        return Detection("diffusers", config)
    markers = ("double_blocks.", "single_blocks.", "transformer_blocks.", "img_in.", "x_embedder.")
    return Mismatch(
        "no img_in/txt_in/vector_in/time_in (BFL) or x_embedder/context_embedder (diffusers)",
        _closeness(view, markers),
    )


# --- VAE ------------------------------------------------------------------------------------------------------

_VAE_PREFIXES = (("", "bfl"), ("vae.", "comfyui"), ("first_stage_model.", "sd"))


def _vae_config(view: HeaderView, prefix: str, down: str, block: str, up: str) -> FluxVAEConfig | str:
    ch, in_channels = view.shape(f"{prefix}encoder.conv_in.weight")[:2]
    levels = view.count_blocks(f"{prefix}encoder.{down}.")
    ch_mult = tuple(view.shape(f"{prefix}encoder.{down}.{i}.{block}.0.conv1.weight")[0] // ch for i in range(levels))
    num_res_blocks = view.count_blocks(f"{prefix}encoder.{down}.0.{block}.")
    z_channels = view.shape(f"{prefix}decoder.conv_in.weight")[1]
    if view.count_blocks(f"{prefix}decoder.{up}.0.{block}.") != num_res_blocks + 1:
        return "the decoder does not have one more resnet per level than the encoder"
    if view.shape(f"{prefix}encoder.conv_out.weight")[0] != 2 * z_channels:
        return f"encoder.conv_out does not give mean and log-variance of {z_channels} latent channels"
    fields: dict[str, Any] = {}
    json = view.config_json or {}
    for ours, theirs in (("scale_factor", "scaling_factor"), ("shift_factor", "shift_factor")):
        if isinstance(json.get(theirs), (int, float)):
            fields[ours] = float(json[theirs])
    return FluxVAEConfig(
        in_channels=in_channels,
        out_ch=view.shape(f"{prefix}decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        **fields,
    )


def detect_vae(view: HeaderView) -> Detection | Mismatch:
    """The FLUX.1 VAE (no quant convs) in BFL, ComfyUI/SD-prefixed, FP8 or diffusers layout."""
    found: tuple[str, str, tuple[str, str, str]] | None = None
    for prefix, fmt in _VAE_PREFIXES:
        if all(f"{prefix}{k}" in view for k in ("encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight")):
            found = (prefix, fmt, ("down", "block", "up"))
            break
    if found is None and "encoder.down_blocks.0.resnets.0.conv1.weight" in view:
        found = ("", "diffusers", ("down_blocks", "resnets", "up_blocks"))
    if found is None:
        markers = ("encoder.", "decoder.")
        return Mismatch(
            "no encoder.conv_in with encoder.down.0.block.0 (BFL) or down_blocks (diffusers)",
            _closeness(view, markers),
        )
    prefix, fmt, names = found
    if f"{prefix}quant_conv.weight" in view:
        return Mismatch("it has quant_conv: a Stable Diffusion style VAE, not the FLUX.1 one", 0.7)
    if f"{prefix}decoder.conv_in.weight" not in view:
        return Mismatch("it has an encoder but no decoder.conv_in", 0.6)
    config = _vae_config(view, prefix, *names)
    if isinstance(config, str):
        return Mismatch(config, 0.6)
    if fmt == "bfl" and _has_fp8(view):
        fmt = "bfl-fp8"
    return Detection(fmt, config)


# --- text encoders ----------------------------------------------------------------------------------------------


def _shapes(view: HeaderView, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix) :]: view.shape(k) for k in view if k.startswith(prefix)}


_CLIP_KEYS = ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight", "final_layer_norm.weight")


def detect_clip(view: HeaderView) -> Detection | Mismatch:
    """A transformers ``CLIPTextModel`` (FLUX's CLIP-L), plain or under ComfyUI's ``text_encoders.clip_l.``."""
    for prefix, fmt in (("", "transformers"), (CLIP_COMFY_PREFIX, "comfyui")):
        for inner in ("text_model.", ""):
            needed = (
                "embeddings.token_embedding.weight",
                "embeddings.position_embedding.weight",
                "final_layer_norm.weight",
            )
            if not all(prefix + inner + k in view for k in needed):
                continue
            if prefix + "vision_model.embeddings.patch_embedding.weight" in view:
                return Mismatch("a full CLIPModel (text and vision); FLUX needs the text model alone", 0.7)
            config_json = view.config_json if not prefix else None
            return Detection(fmt, clip_config_from_shapes(_shapes(view, prefix + inner), config_json))
    return Mismatch("no text_model.embeddings.token_embedding.weight", _closeness(view, ("text_model.",)))


def detect_t5(view: HeaderView) -> Detection | Mismatch:
    """A transformers ``T5EncoderModel`` (FLUX's T5-XXL v1.1), plain, sharded, or under ``text_encoders.t5xxl.``."""
    for prefix, fmt in (("", "transformers"), (T5_COMFY_PREFIX, "comfyui")):
        bias = prefix + "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        embedding = prefix + "shared.weight" in view or prefix + "encoder.embed_tokens.weight" in view
        if bias in view and embedding:
            if prefix + "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in view:
                return Mismatch("every block has its own relative attention bias: UMT5, not T5", 0.7)
            config_json = view.config_json if not prefix else None
            return Detection(fmt, t5_config_from_shapes(_shapes(view, prefix), config_json))
    return Mismatch(
        "no encoder.block.0 relative attention bias with shared embeddings", _closeness(view, ("encoder.block.",))
    )


DIT_SPEC = ModelSpec(
    name="flux.1.dit",
    family="flux.1",
    model_class=FluxDiT,
    config_class=FluxDiTConfig,
    detect=detect_dit,
    formats={fmt: dit_recipe(fmt) for fmt in ("bfl", "bfl-fp8", "comfyui", "comfyui-fp8", "diffusers")},
    never_fp8=FluxDiT.ds_vram_never_fp8,
)
VAE_SPEC = ModelSpec(
    name="flux.1.vae",
    family="flux.1",
    model_class=FluxVAE,
    config_class=FluxVAEConfig,
    detect=detect_vae,
    formats={fmt: vae_recipe(fmt) for fmt in ("bfl", "bfl-fp8", "comfyui", "sd", "diffusers")},
)
CLIP_SPEC = ModelSpec(
    name="flux.1.text_encoder_clip",
    family="flux.1",
    model_class=CLIPTextModel,
    config_class=CLIPTextConfig,
    detect=detect_clip,
    formats={"transformers": clip_recipe(), "comfyui": clip_recipe(CLIP_COMFY_PREFIX)},
    build=build_clip_text_model,
)
T5_SPEC = ModelSpec(
    name="flux.1.text_encoder_t5",
    family="flux.1",
    model_class=T5EncoderModel,
    config_class=T5Config,
    detect=detect_t5,
    formats={"transformers": t5_recipe(), "comfyui": t5_recipe(T5_COMFY_PREFIX)},
    build=build_t5_encoder,
)
SPECS = (DIT_SPEC, VAE_SPEC, CLIP_SPEC, T5_SPEC)
