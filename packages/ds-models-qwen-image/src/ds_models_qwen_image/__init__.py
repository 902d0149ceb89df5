"""Qwen-Image: the dual-stream MMDiT with the official parameter names, the blockwise and InstantX Union
ControlNets, the Qwen2.5-VL text encoder (transformers) with the text-to-image and edit prompt templates, detection
specs, presets and the family descriptor. The VAE is the Wan 2.1 VAE, reused from ``ds_models_wan`` (``WanVAE``,
the ``"wan.vae"`` spec)."""

from ds_models_qwen_image.controlnet import (
    CONTROLNET_SPECS,
    QwenImageBlockwiseControlNet,
    QwenImageBlockwiseControlNetConfig,
    QwenImageControlNetUnion,
    QwenImageControlNetUnionConfig,
)
from ds_models_qwen_image.dit import QwenImageDiT, QwenImageDiTConfig, pack_latents, unpack_latents
from ds_models_qwen_image.presets import CONTROLNETS, LIGHTNING_LORAS, PRESETS, QwenImagePreset, get_preset
from ds_models_qwen_image.schedules import SCHEDULES
from ds_models_qwen_image.specs import DIT_SPEC, SPECS, TEXT_ENCODER_SPEC
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
    "CONTROLNETS",
    "CONTROLNET_SPECS",
    "DIT_SPEC",
    "LIGHTNING_LORAS",
    "MAX_PROMPT_TOKENS",
    "PRESETS",
    "SCHEDULES",
    "SPECS",
    "TEXT_ENCODER_SPEC",
    "PromptTooLongError",
    "QwenImageBlockwiseControlNet",
    "QwenImageBlockwiseControlNetConfig",
    "QwenImageControlNetUnion",
    "QwenImageControlNetUnionConfig",
    "QwenImageDiT",
    "QwenImageDiTConfig",
    "QwenImagePreset",
    "WanVAE",
    "WanVAEConfig",
    "build_text_encoder",
    "decode_latents",
    "encode_edit_prompt",
    "encode_image",
    "encode_prompt",
    "format_edit_prompt",
    "format_prompt",
    "get_preset",
    "load_processor",
    "pack_latents",
    "qwen25vl_7b_config",
    "tiny_text_encoder_config",
    "unpack_latents",
]
