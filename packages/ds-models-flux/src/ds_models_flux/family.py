"""FLUX.1 as a plug-in family: the one descriptor the shared layers read (registered under ``ds.families``)."""

from __future__ import annotations

import re
from dataclasses import replace

from torch import nn

from ds_loader.families import FamilyDescriptor, LoraNaming, Preset, TokenLayout
from ds_models_flux.dit import FluxDiT, FluxDiTConfig
from ds_models_flux.lora import bfl_layer_from_flat, diffusers_lora_names, diffusers_lora_target
from ds_models_flux.presets import PRESETS, FluxPreset
from ds_models_flux.schedules import SCHEDULES
from ds_models_flux.vae import FluxVAE, FluxVAEConfig

__all__ = ["FAMILY", "build_components", "build_tiny_components", "text_encoder_configs"]


def text_encoder_configs() -> dict[str, object]:
    """CLIP-L text model and T5-XXL encoder configs at the sizes every FLUX.1 release ships."""
    from transformers import CLIPTextConfig, T5Config

    clip = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    t5 = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return {"text_encoder": clip, "text_encoder_2": t5}


def build_components(preset: Preset) -> dict[str, nn.Module]:
    """The released DiT, VAE and both text encoders of ``preset``, built in the caller's device context."""
    from transformers import CLIPTextModel, T5EncoderModel

    if not isinstance(preset, FluxPreset) or preset.dit_config is None:
        raise ValueError(f"preset {preset.name!r} has no released FLUX.1 configuration; size it from its files")
    configs = text_encoder_configs()
    return {
        "dit": FluxDiT(FluxDiTConfig.preset(preset.dit_config)),
        "vae": FluxVAE(FluxVAEConfig.flux1()),
        "text_encoder": CLIPTextModel(configs["text_encoder"]),
        "text_encoder_2": T5EncoderModel(configs["text_encoder_2"]),
    }


def build_tiny_components(preset: Preset) -> dict[str, nn.Module]:
    """``build_components`` at test size: the same architectures (a tiny DiT with the released one's input channels
    and guidance embedding, VAE, CLIP and a T5 as wide as the DiT's ``context_in_dim``), for any FLUX.1 preset, the
    demo included."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if not isinstance(preset, FluxPreset):
        raise ValueError(f"preset {preset.name!r} is not a FLUX.1 preset")
    dit_config = FluxDiTConfig.tiny()
    if preset.dit_config is not None:  # Fill-dev's extra input channels, schnell's missing guidance embedding
        released = FluxDiTConfig.preset(preset.dit_config)
        dit_config = replace(dit_config, in_channels=released.in_channels, guidance_embed=released.guidance_embed)
    ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
    clip = CLIPTextConfig(vocab_size=99, hidden_size=dit_config.vec_in_dim, intermediate_size=37, **ids)
    small = {"d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4, "is_encoder_decoder": False}
    t5 = T5Config(vocab_size=99, d_model=dit_config.context_in_dim, **small)
    return {
        "dit": FluxDiT(dit_config),
        "vae": FluxVAE(FluxVAEConfig.tiny()),
        "text_encoder": CLIPTextModel(clip),
        "text_encoder_2": T5EncoderModel(t5),
    }


def token_layout(preset: Preset) -> TokenLayout:
    """8x VAE and 2x2 patches; the T5 prompt tokens join the image tokens in joint attention."""
    return TokenLayout(1 / 256, text_tokens=getattr(preset, "t5_sequence_length", 512))


FAMILY = FamilyDescriptor(
    id="flux.1",
    title="FLUX.1",
    kind="image",
    presets=PRESETS,
    pipeline="ds_pipelines.flux_image:FluxImagePipeline",
    training_adapter="ds_train.flux:FluxTrainingAdapter",
    dit_specs=("flux.1.dit",),
    component_specs={
        "flux.1.dit": "dit",
        "flux.1.vae": "vae",
        "flux.1.text_encoder_clip": "text_encoder",
        "flux.1.text_encoder_t5": "text_encoder_2",
    },
    diffusers_classes=(
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxKontextPipeline",
        "FluxFillPipeline",
        "FluxTransformer2DModel",
    ),
    build_components=build_components,
    build_tiny_components=build_tiny_components,
    token_layout=token_layout,
    lora=LoraNaming(
        # diffusers' double-block names (transformer_blocks.N.attn.to_q) are Qwen-Image's too; FLUX.1 has 19 of them,
        # so only indices 0-18 count as FLUX.1 evidence (guess_lora_family weighs the rest).
        sign=re.compile(
            r"(?:^|[._])(?:(?:double|single)_blocks[._]\d+|single_transformer_blocks[._]\d+"
            r"|transformer_blocks[._](?:1[0-8]|\d)[._](?:attn|norm1|norm1_context|ff|ff_context))(?:[._]|$)"
        ),
        to_diffusers=diffusers_lora_names,
        from_diffusers=diffusers_lora_target,
        from_flat=bfl_layer_from_flat,
        metadata={
            "ss_network_module": "networks.lora_flux",
            "ss_base_model_version": "flux1",
            "modelspec.architecture": "flux-1-dev/lora",
            "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        },
    ),
    schedules=SCHEDULES,
    default_size=(1024, 1024),
    description="Black Forest Labs' 12B rectified-flow MMDiT: dev, schnell, Krea-dev, Kontext-dev, Fill-dev",
)
