"""FLUX.1 models: the DiT and VAE with the parameter names of the official BFL release, the CLIP and T5 text
encoders (transformers classes), detection specs for ds-loader, and the released models as presets."""

from ds_models_flux.dit import FluxDiT, FluxDiTConfig
from ds_models_flux.presets import PRESETS, FluxFile, FluxPreset, get_preset
from ds_models_flux.schedules import SCHEDULES
from ds_models_flux.specs import CLIP_SPEC, DIT_SPEC, SPECS, T5_SPEC, VAE_SPEC
from ds_models_flux.text_encoders import CLIP_MAX_LENGTH, FluxTextEncoders, PromptTruncatedWarning, load_tokenizers
from ds_models_flux.vae import FluxVAE, FluxVAEConfig

__all__ = [
    "CLIP_MAX_LENGTH",
    "CLIP_SPEC",
    "DIT_SPEC",
    "PRESETS",
    "SCHEDULES",
    "SPECS",
    "T5_SPEC",
    "VAE_SPEC",
    "FluxDiT",
    "FluxDiTConfig",
    "FluxFile",
    "FluxPreset",
    "FluxTextEncoders",
    "FluxVAE",
    "FluxVAEConfig",
    "PromptTruncatedWarning",
    "get_preset",
    "load_tokenizers",
]
