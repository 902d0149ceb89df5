"""Qwen-Image: the dual-stream MMDiT with the official parameter names, the Qwen2.5-VL text encoder
(transformers) with the text-to-image and edit prompt templates, detection specs, presets and the family descriptor.
The VAE is the Wan 2.1 VAE, reused from ``ds_models_wan`` (``WanVAE``, the ``"wan.vae"`` spec)."""

from ds_models_qwen_image.schedules import SCHEDULES
from ds_models_qwen_image.specs import SPECS, TEXT_ENCODER_SPEC
from ds_models_qwen_image.text_encoder import (
    MAX_PROMPT_TOKENS,
    PromptTooLongError,
    build_text_encoder,
    encode_edit_prompt,
    encode_prompt,
    format_edit_prompt,
    format_prompt,
    load_processor,
    qwen25vl_7b_config,
    tiny_text_encoder_config,
)
from ds_models_qwen_image.vae import WanVAE, WanVAEConfig, decode_latents, encode_image

__all__ = [
    "MAX_PROMPT_TOKENS",
    "SCHEDULES",
    "SPECS",
    "TEXT_ENCODER_SPEC",
    "PromptTooLongError",
    "WanVAE",
    "WanVAEConfig",
    "build_text_encoder",
    "decode_latents",
    "encode_edit_prompt",
    "encode_image",
    "encode_prompt",
    "format_edit_prompt",
    "format_prompt",
    "load_processor",
    "qwen25vl_7b_config",
    "tiny_text_encoder_config",
]
