"""Z-Image as a plug-in family: the one descriptor the shared layers read (registered under ``ds.families``)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn
from transformers import Qwen3Config, Siglip2VisionConfig

from ds_loader.families import FamilyDescriptor, Preset, TokenLayout
from ds_models_flux import FluxVAE, FluxVAEConfig
from ds_models_z_image.dit import ZImageDiT, ZImageDiTConfig
from ds_models_z_image.image_encoder import build_image_encoder, siglip2_428m_config
from ds_models_z_image.lora import NAMING
from ds_models_z_image.presets import PRESETS, ZImagePreset
from ds_models_z_image.schedules import SCHEDULES
from ds_models_z_image.text_encoder import MAX_PROMPT_TOKENS, build_text_encoder, qwen3_4b_config

__all__ = [
    "FAMILY",
    "build_components",
    "build_tiny_components",
    "tiny_image_encoder_config",
    "tiny_text_encoder_config",
    "token_layout",
]


def _dit_config(preset: Preset) -> ZImageDiTConfig:
    if not isinstance(preset, ZImagePreset) or preset.dit_config is None:
        raise ValueError(f"preset {preset.name!r} has no released Z-Image configuration; size it from its files")
    return ZImageDiTConfig.preset(preset.dit_config)


def build_components(preset: Preset) -> dict[str, nn.Module]:
    """The released DiT, the FLUX.1 VAE and the Qwen3-4B text encoder of ``preset``, built in the caller's device
    context, and for Omni-Base its SigLIP2 image encoder (``image_encoder``, ``siglip/``)."""
    config = _dit_config(preset)
    components: dict[str, nn.Module] = {
        "dit": ZImageDiT(config),
        "vae": FluxVAE(FluxVAEConfig.flux1()),
        "text_encoder": build_text_encoder(qwen3_4b_config()),
    }
    if config.siglip_feat_dim is not None:
        components["image_encoder"] = build_image_encoder(siglip2_428m_config())
    return components


def tiny_text_encoder_config(hidden_size: int = 32) -> Qwen3Config:
    """A Qwen3 text encoder at test size (3 layers, so ``hidden_states[-2]`` is a middle layer)."""
    return Qwen3Config(
        vocab_size=256,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        use_cache=False,
    )


def tiny_image_encoder_config(hidden_size: int = 24) -> Siglip2VisionConfig:
    """A SigLIP2 vision encoder at test size: 2 layers of 2 heads, patch 16, 16 position embeddings."""
    return Siglip2VisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_patches=16,
        patch_size=16,
    )


def build_tiny_components(preset: Preset) -> dict[str, nn.Module]:
    """``build_components`` at test size: the same architectures (Omni-Base's tiny DiT keeps its SigLIP path)."""
    released = _dit_config(preset)
    dit_config = ZImageDiTConfig.tiny()
    if released.siglip_feat_dim is not None:
        dit_config = replace(dit_config, siglip_feat_dim=24)
    components: dict[str, nn.Module] = {
        "dit": ZImageDiT(dit_config),
        "vae": FluxVAE(FluxVAEConfig.tiny()),
        "text_encoder": build_text_encoder(tiny_text_encoder_config(dit_config.cap_feat_dim)),
    }
    if dit_config.siglip_feat_dim is not None:
        components["image_encoder"] = build_image_encoder(tiny_image_encoder_config(dit_config.siglip_feat_dim))
    return components


def token_layout(preset: Preset) -> TokenLayout:
    """8x VAE and 2x2 patches; up to 512 prompt tokens join the image tokens in the one sequence."""
    return TokenLayout(1 / 256, text_tokens=MAX_PROMPT_TOKENS)


FAMILY = FamilyDescriptor(
    id="z-image",
    title="Z-Image",
    kind="image",
    presets=PRESETS,
    pipeline="ds_pipelines.z_image:ZImagePipeline",
    training_adapter="ds_train.z_image:ZImageTrainingAdapter",
    dit_specs=("z-image.dit",),
    component_specs={
        "z-image.dit": "dit",
        "flux.1.vae": "vae",
        "z-image.text_encoder": "text_encoder",
        "z-image.controlnet": "controlnet",
        "z-image.image_encoder": "image_encoder",
    },
    diffusers_classes=(
        "ZImagePipeline",
        "ZImageImg2ImgPipeline",
        "ZImageInpaintPipeline",
        "ZImageControlNetPipeline",
        "ZImageControlNetInpaintPipeline",
        "ZImageOmniPipeline",
        "ZImageTransformer2DModel",
    ),
    build_components=build_components,
    build_tiny_components=build_tiny_components,
    token_layout=token_layout,
    lora=NAMING,
    schedules=SCHEDULES,
    default_size=(1024, 1024),
    description="Tongyi-MAI's 6B single-stream DiT with a Qwen3-4B text encoder and the FLUX.1 VAE: Turbo, base, "
    "Omni-Base",
)
