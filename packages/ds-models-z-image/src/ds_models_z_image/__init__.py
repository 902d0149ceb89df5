"""Z-Image (Tongyi-MAI): the single-stream DiT with the official parameter names, the Qwen3-4B text encoder
(transformers), detection specs, presets and the family descriptor. The VAE is the FLUX.1 VAE, reused from
``ds_models_flux`` (``FluxVAE``, ``VAE_SPEC``)."""

from ds_models_z_image.controlnet import CONTROLNET_SPEC, ZImageControlHints, ZImageControlNet, ZImageControlNetConfig
from ds_models_z_image.dit import (
    SEQ_MULTIPLE,
    ZImageBlock,
    ZImageDiT,
    ZImageDiTConfig,
    caption_groups,
    padded_length,
    sequence_positions,
)
from ds_models_z_image.image_encoder import IMAGE_ENCODER_SPEC, build_image_encoder, siglip2_428m_config
from ds_models_z_image.presets import PRESETS, ZImagePreset, get_preset
from ds_models_z_image.schedules import SCHEDULES
from ds_models_z_image.specs import DIT_SPEC, SPECS, TEXT_ENCODER_SPEC
from ds_models_z_image.text_encoder import (
    MAX_PROMPT_TOKENS,
    PromptTooLongError,
    build_text_encoder,
    encode_prompt,
    format_prompt,
    qwen3_4b_config,
)

__all__ = [
    "CONTROLNET_SPEC",
    "DIT_SPEC",
    "IMAGE_ENCODER_SPEC",
    "MAX_PROMPT_TOKENS",
    "PRESETS",
    "SCHEDULES",
    "SEQ_MULTIPLE",
    "SPECS",
    "TEXT_ENCODER_SPEC",
    "PromptTooLongError",
    "ZImageBlock",
    "ZImageControlHints",
    "ZImageControlNet",
    "ZImageControlNetConfig",
    "ZImageDiT",
    "ZImageDiTConfig",
    "ZImagePreset",
    "build_image_encoder",
    "build_text_encoder",
    "caption_groups",
    "encode_prompt",
    "format_prompt",
    "get_preset",
    "padded_length",
    "qwen3_4b_config",
    "sequence_positions",
    "siglip2_428m_config",
]
