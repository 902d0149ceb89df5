"""Wan 2.1 / 2.2 models: the DiT and both VAEs with the parameter names of the official Wan-AI release, the umT5
text encoder and CLIP image encoder (transformers classes), detection specs for ds-loader, and the released
models as presets."""

from ds_models_wan.dit import WanDiT, WanDiTConfig
from ds_models_wan.image_encoder import clip_vit_h14_config, encode_image
from ds_models_wan.presets import PRESETS, WanFile, WanPreset, get_preset
from ds_models_wan.schedules import SCHEDULES
from ds_models_wan.specs import DIT_SPEC, SPECS
from ds_models_wan.text_encoder import encode_prompt, load_wan_tokenizer, umt5_xxl_config
from ds_models_wan.vae import WanVAE, WanVAEConfig
from ds_models_wan.vae22 import WanVAE22, WanVAE22Config

__all__ = [
    "DIT_SPEC",
    "PRESETS",
    "SCHEDULES",
    "SPECS",
    "WanDiT",
    "WanDiTConfig",
    "WanFile",
    "WanPreset",
    "WanVAE",
    "WanVAE22",
    "WanVAE22Config",
    "WanVAEConfig",
    "clip_vit_h14_config",
    "encode_image",
    "encode_prompt",
    "get_preset",
    "load_wan_tokenizer",
    "umt5_xxl_config",
]
