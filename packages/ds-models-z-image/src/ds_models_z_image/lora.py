"""Z-Image LoRA names: ours, diffusers' and kohya's flat names.

Our module names are the official ones, and diffusers' ``ZImageTransformer2DModel`` keeps them unchanged (its
``layers.N.attention.to_q``, ``feed_forward.w1``, ``adaLN_modulation.0``, ``all_x_embedder.2-1``... are the
released keys), so a diffusers LoRA module name is our layer name: the map is the identity over the layers a LoRA
can target. kohya-style trainers write the same names with dots as underscores (``lora_unet_layers_0_attention_to_q``);
underscores inside names (``feed_forward``, ``to_out``, ``noise_refiner``) make that ambiguous, so flat names are read
against the vocabulary of our LoRA-able layers.
"""

from __future__ import annotations

import re

from ds_loader.families import LoraTarget

__all__ = [
    "BLOCK_LAYERS",
    "LORA_SIGN",
    "STACKS",
    "TOP_LAYERS",
    "diffusers_lora_names",
    "diffusers_lora_target",
    "layer_from_flat",
]

STACKS = ("layers", "noise_refiner", "context_refiner", "siglip_refiner")
# Linear layers inside a block, relative to it.
BLOCK_LAYERS = (
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
    "feed_forward.w1",
    "feed_forward.w2",
    "feed_forward.w3",
    "adaLN_modulation.0",
)
# Linear layers outside the blocks.
TOP_LAYERS = (
    "all_x_embedder.2-1",
    "all_final_layer.2-1.linear",
    "all_final_layer.2-1.adaLN_modulation.1",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "cap_embedder.1",
    "siglip_embedder.1",
)
# Block-level names that give Z-Image away in any of the three namings (FLUX.1 says double_blocks/single_blocks or
# transformer_blocks, Wan blocks.N.self_attn/cross_attn/ffn, Qwen3 text encoders layers.N.self_attn/mlp).
LORA_SIGN = re.compile(
    r"(?:^|[._])(?:layers[._]\d+[._](?:attention|feed_forward|adaLN_modulation)"
    r"|(?:noise|context|siglip)_refiner[._]\d+[._])"
)
_BLOCK = re.compile(r"(?:" + "|".join(STACKS) + r")\.\d+\.(?:" + "|".join(map(re.escape, BLOCK_LAYERS)) + r")")
_FLAT_BLOCK = re.compile(r"(?P<stack>" + "|".join(STACKS) + r")_(?P<i>\d+)_(?P<layer>.+)")
_FLAT_BLOCK_LAYERS = {layer.replace(".", "_"): layer for layer in BLOCK_LAYERS}
# "2-1" is kept by kohya (it replaces dots only); some tools also write "2_1".
_FLAT_TOP = {layer.replace(".", "_"): layer for layer in TOP_LAYERS} | {
    layer.replace(".", "_").replace("2-1", "2_1"): layer for layer in TOP_LAYERS
}


def _is_layer(name: str) -> bool:
    return name in TOP_LAYERS or _BLOCK.fullmatch(name) is not None


def diffusers_lora_names(layer: str) -> list[str] | None:
    """The diffusers module name a LoRA on our ``layer`` is saved under (the same name), or None."""
    return [layer] if _is_layer(layer) else None


def diffusers_lora_target(module_name: str) -> LoraTarget | None:
    """Our layer for a diffusers ``ZImageTransformer2DModel`` module name (without ``transformer.``), or None."""
    return LoraTarget(module_name) if _is_layer(module_name) else None


def layer_from_flat(flat: str) -> str | None:
    """Our layer for a kohya flat name without its ``lora_unet_`` prefix (``layers_0_attention_to_q``), or None."""
    if flat in _FLAT_TOP:
        return _FLAT_TOP[flat]
    match = _FLAT_BLOCK.fullmatch(flat)
    if match is None or match["layer"] not in _FLAT_BLOCK_LAYERS:
        return None
    return f"{match['stack']}.{match['i']}.{_FLAT_BLOCK_LAYERS[match['layer']]}"
