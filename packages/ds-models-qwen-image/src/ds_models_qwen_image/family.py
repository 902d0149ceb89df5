"""Qwen-Image as a plug-in family: the one descriptor the shared layers read (registered under ``ds.families``)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ds_loader.families import FamilyDescriptor, Preset, TokenLayout
from ds_models_qwen_image.dit import QwenImageDiT, QwenImageDiTConfig
from ds_models_qwen_image.lora import NAMING
from ds_models_qwen_image.presets import PRESETS, QwenImagePreset
from ds_models_qwen_image.schedules import SCHEDULES
from ds_models_qwen_image.text_encoder import (
    MAX_PROMPT_TOKENS,
    build_text_encoder,
    qwen25vl_7b_config,
    tiny_text_encoder_config,
)
from ds_models_qwen_image.vae import VAE_SPEC_NAME, WanVAE, WanVAEConfig, qwen_image_vae_config

__all__ = ["FAMILY", "build_components", "build_tiny_components", "token_layout"]


def _dit_config(preset: Preset) -> QwenImageDiTConfig:
    if not isinstance(preset, QwenImagePreset) or preset.dit_config is None:
        raise ValueError(f"preset {preset.name!r} has no released Qwen-Image configuration; size it from its files")
    return QwenImageDiTConfig.preset(preset.dit_config)


def build_components(preset: Preset) -> dict[str, nn.Module]:
    """The released DiT, the Wan 2.1 VAE and the Qwen2.5-VL-7B text encoder of ``preset``, built in the caller's
    device context (the tokenizer and processor are not modules)."""
    return {
        "dit": QwenImageDiT(_dit_config(preset)),
        "vae": WanVAE(qwen_image_vae_config()),
        "text_encoder": build_text_encoder(qwen25vl_7b_config()),
    }


def build_tiny_components(preset: Preset) -> dict[str, nn.Module]:
    """``build_components`` at test size: the same architectures (Edit-2511's tiny DiT keeps ``zero_cond_t``); the
    tiny text encoder's width is the tiny DiT's prompt width, its token ids those of the tests' tokenizer."""
    released = _dit_config(preset)
    dit_config = QwenImageDiTConfig.tiny()
    if released.zero_cond_t:
        dit_config = replace(dit_config, zero_cond_t=True)
    return {
        "dit": QwenImageDiT(dit_config),
        "vae": WanVAE(WanVAEConfig.tiny()),
        "text_encoder": build_text_encoder(tiny_text_encoder_config(hidden_size=dit_config.joint_attention_dim)),
    }


def token_layout(preset: Preset) -> TokenLayout:
    """8x VAE and 2x2 patches; up to 512 prompt tokens join the image tokens in the joint attention (edit models
    add each reference image's tokens, which the layout does not count)."""
    return TokenLayout(1 / 256, text_tokens=MAX_PROMPT_TOKENS)


FAMILY = FamilyDescriptor(
    id="qwen-image",
    title="Qwen-Image",
    kind="image",
    presets=PRESETS,
    pipeline="ds_pipelines.qwen_image:QwenImagePipeline",
    training_adapter="ds_train.qwen_image:QwenImageTrainingAdapter",
    dit_specs=("qwen-image.dit",),
    component_specs={
        "qwen-image.dit": "dit",
        VAE_SPEC_NAME: "vae",
        "qwen-image.text_encoder": "text_encoder",
        "qwen-image.blockwise_controlnet": "controlnet",
        "qwen-image.controlnet_union": "controlnet",
    },
    diffusers_classes=(
        "QwenImagePipeline",
        "QwenImageImg2ImgPipeline",
        "QwenImageInpaintPipeline",
        "QwenImageEditPipeline",
        "QwenImageEditInpaintPipeline",
        "QwenImageEditPlusPipeline",
        "QwenImageControlNetPipeline",
        "QwenImageControlNetInpaintPipeline",
        "QwenImageTransformer2DModel",
    ),
    build_components=build_components,
    build_tiny_components=build_tiny_components,
    token_layout=token_layout,
    lora=NAMING,
    schedules=SCHEDULES,
    default_size=(1328, 1328),
    description="Alibaba Qwen's 20B dual-stream MMDiT with a Qwen2.5-VL-7B text encoder and the Wan 2.1 VAE: "
    "text-to-image (Qwen-Image, 2512) and instruction editing (Edit, Edit-2509, Edit-2511)",
)
