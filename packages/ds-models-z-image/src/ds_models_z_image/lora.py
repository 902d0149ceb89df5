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

from ds_loader.families import LoraVocabulary

__all__ = [
    "BLOCK_LAYERS",
    "LORA_METADATA",
    "LORA_SIGN",
    "NAMING",
    "STACKS",
    "TOP_LAYERS",
    "VOCABULARY",
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
LORA_METADATA = {
    "ss_network_module": "networks.lora_zimage",
    "ss_base_model_version": "zimage",
    "modelspec.architecture": "z-image/lora",
    "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image",
}
VOCABULARY = LoraVocabulary(STACKS, BLOCK_LAYERS, TOP_LAYERS)
NAMING = VOCABULARY.naming(LORA_SIGN, LORA_METADATA)
diffusers_lora_names = VOCABULARY.to_diffusers
diffusers_lora_target = VOCABULARY.from_diffusers
layer_from_flat = VOCABULARY.from_flat
