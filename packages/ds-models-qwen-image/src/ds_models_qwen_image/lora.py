"""Qwen-Image LoRA names: ours, diffusers', kohya/musubi flat names and ComfyUI's.

Our DiT module names are diffusers' ``QwenImageTransformer2DModel`` names (the released keys), so a diffusers LoRA
module name (``transformer.`` stripped by the reader) is our layer name: the map is the identity over the layers a
LoRA can target. ComfyUI writes the same names under ``diffusion_model.`` (stripped by the reader too).
kohya-style trainers (musubi-tuner's ``networks.lora_qwen_image``) write them with dots as underscores after
``lora_unet_`` (``lora_unet_transformer_blocks_0_attn_to_q``); underscores inside names (``to_add_out``,
``img_mlp``, ``add_q_proj``) make that ambiguous, so flat names are read against the vocabulary of our layers.
"""

from __future__ import annotations

import re

from ds_loader.families import LoraVocabulary

__all__ = [
    "BLOCK_LAYERS",
    "LORA_METADATA",
    "LORA_SIGN",
    "NAMING",
    "TOP_LAYERS",
    "VOCABULARY",
    "diffusers_lora_names",
    "diffusers_lora_target",
    "layer_from_flat",
]

# Linear layers inside a transformer block, relative to it.
BLOCK_LAYERS = (
    "img_mod.1",
    "txt_mod.1",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
# Linear layers outside the blocks.
TOP_LAYERS = (
    "img_in",
    "txt_in",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "norm_out.linear",
    "proj_out",
)
# A block-level name in any of the namings: transformer_blocks.N followed by one of Qwen-Image's block parts, not
# inside FLUX's single_transformer_blocks. Attention names (attn.to_q, attn.add_q_proj, attn.to_add_out) are the
# same in FLUX.1's diffusers layout; img_mod / txt_mod / img_mlp / txt_mlp and block numbers above 18 are Qwen-Image's
# alone.
LORA_SIGN = re.compile(r"(?:^|\.|lora_unet_)transformer_blocks[._]\d+[._](?:attn|img_mod|txt_mod|img_mlp|txt_mlp)[._]")
# The values musubi-tuner (networks.lora_qwen_image, architecture "qwen_image") writes.
LORA_METADATA = {
    "ss_network_module": "networks.lora_qwen_image",
    "ss_base_model_version": "qwen_image",
    "modelspec.architecture": "qwen-image/lora",
    "modelspec.implementation": "https://github.com/QwenLM/Qwen-Image",
}

VOCABULARY = LoraVocabulary(("transformer_blocks",), BLOCK_LAYERS, TOP_LAYERS)
NAMING = VOCABULARY.naming(LORA_SIGN, LORA_METADATA)
diffusers_lora_names = VOCABULARY.to_diffusers
diffusers_lora_target = VOCABULARY.from_diffusers
layer_from_flat = VOCABULARY.from_flat
