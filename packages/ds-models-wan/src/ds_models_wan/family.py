"""Wan 2.1 / 2.2 as a plug-in family: the one descriptor the shared layers read (registered under ``ds.families``)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from ds_loader.families import FamilyDescriptor, LoraNaming, Preset, TokenLayout
from ds_models_wan.dit import WanDiT, WanDiTConfig
from ds_models_wan.image_encoder import build_clip_vision_model, clip_vit_h14_config, tiny_clip_vision_config
from ds_models_wan.lora import LORA_SIGN, wan_diffusers_lora_name, wan_layer_from_flat, wan_lora_target
from ds_models_wan.presets import PRESETS, WanPreset
from ds_models_wan.schedules import SCHEDULES
from ds_models_wan.text_encoder import build_umt5_encoder, tiny_umt5_config, umt5_xxl_config
from ds_models_wan.vae import WanVAE, WanVAEConfig
from ds_models_wan.vae22 import WanVAE22, WanVAE22Config

__all__ = ["FAMILY", "build_components", "build_tiny_components"]

# The pipeline's component for each of a preset's DiT files (the A14B experts: high noise first, as sampled).
PIPELINE_COMPONENTS = {"dit": "dit", "dit_high_noise": "dit", "dit_low_noise": "dit2"}


def build_components(preset: Preset) -> dict[str, nn.Module]:
    """The released DiT(s), VAE, umT5-XXL and (2.1 image models) CLIP ViT-H/14 of ``preset``, built in the caller's
    device context; the A14B experts share one architecture and are built once each."""
    if not isinstance(preset, WanPreset):
        raise ValueError(f"preset {preset.name!r} is not a Wan release")
    config = WanDiTConfig.preset(preset.dit_config)
    modules: dict[str, nn.Module] = {name: WanDiT(config) for name in preset.files if name.startswith("dit")}
    if preset.vae_config == "wan2.2":
        modules["vae"] = WanVAE22(WanVAE22Config.preset("wan2.2"))
    else:
        modules["vae"] = WanVAE(WanVAEConfig.preset(preset.vae_config))
    modules["text_encoder"] = build_umt5_encoder(umt5_xxl_config())
    if "image_encoder" in preset.files:
        modules["image_encoder"] = build_clip_vision_model(clip_vit_h14_config())
    return modules


# The tiny DiT of each model type (``WanDiTConfig`` presets): the same inputs as the released models take.
TINY_DIT_CONFIGS = {"t2v": "tiny", "i2v": "tiny-i2v", "flf2v": "tiny-flf2v", "ti2v": "tiny-ti2v"}


def build_tiny_components(preset: Preset) -> dict[str, nn.Module]:
    """``build_components`` at test size: the tiny DiT of the preset's model type (one per expert), the tiny VAE of
    its generation, a tiny umT5 as wide as the DiT's ``text_dim`` and (2.1 image models) a tiny CLIP ViT."""
    if not isinstance(preset, WanPreset):
        raise ValueError(f"preset {preset.name!r} is not a Wan release")
    config = WanDiTConfig.preset(TINY_DIT_CONFIGS[preset.model_type])
    if not WanDiTConfig.preset(preset.dit_config).has_image_input:  # 2.2 I2V-A14B: no CLIP image tokens
        config = replace(config, has_image_input=False)
    modules: dict[str, nn.Module] = {name: WanDiT(config) for name in preset.files if name.startswith("dit")}
    modules["vae"] = WanVAE22(WanVAE22Config.tiny()) if preset.vae_config == "wan2.2" else WanVAE(WanVAEConfig.tiny())
    text_config = tiny_umt5_config()
    text_config.d_model = config.text_dim
    modules["text_encoder"] = build_umt5_encoder(text_config)
    if "image_encoder" in preset.files:
        modules["image_encoder"] = build_clip_vision_model(tiny_clip_vision_config())
    return modules


def token_layout(preset: Preset) -> TokenLayout:
    """2x2 patches over the VAE's grid (8x for the 2.1 VAE, 16x for 2.2's); 4 frames per latent frame; text enters
    through cross-attention."""
    spatial = 16 if getattr(preset, "vae_config", "wan2.1") == "wan2.2" else 8
    return TokenLayout(1 / (4 * spatial**2), temporal_compression=4)


def _diffusers_names(layer: str) -> list[str] | None:
    name = wan_diffusers_lora_name(layer)
    return [name] if name else None


FAMILY = FamilyDescriptor(
    id="wan",
    title="Wan",
    kind="video",
    presets=PRESETS,
    pipeline="ds_pipelines.wan_video:WanVideoPipeline",
    training_adapter="ds_train.wan:WanTrainingAdapter",
    dit_specs=("wan.dit",),
    component_specs={
        "wan.dit": "dit",
        "wan.vae": "vae",
        "wan.vae22": "vae",
        "wan.text_encoder": "text_encoder",
        "wan.image_encoder": "image_encoder",
    },
    diffusers_classes=(
        "WanPipeline",
        "WanImageToVideoPipeline",
        "WanVideoToVideoPipeline",
        "WanTransformer3DModel",
    ),
    build_components=build_components,
    build_tiny_components=build_tiny_components,
    token_layout=token_layout,
    lora=LoraNaming(
        sign=LORA_SIGN,
        to_diffusers=_diffusers_names,
        from_diffusers=wan_lora_target,
        from_flat=wan_layer_from_flat,
        metadata={
            "ss_network_module": "networks.lora_wan",
            "ss_base_model_version": "wan2.1",
            "modelspec.architecture": "wan2.1/lora",
            "modelspec.implementation": "https://github.com/Wan-Video/Wan2.1",
        },
    ),
    schedules=SCHEDULES,
    default_size=(480, 832),
    description="Wan-AI's video DiTs: 2.1 T2V/I2V/FLF2V, 2.2 A14B experts and TI2V-5B",
)
