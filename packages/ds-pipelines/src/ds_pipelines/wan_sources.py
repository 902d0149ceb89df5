"""Where a Wan pipeline's components come from (presets, Wan-AI and diffusers folders, detected files), and the
map from diffusers ``WanTransformer3DModel`` LoRA names to the official layer names our DiT uses."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import base
from .lora import _Whole

__all__ = [
    "component_sources",
    "find_preset",
    "named_sources",
    "source_folder",
    "spec_for",
    "wan_diffusers_lora_name",
    "wan_layer_from_flat",
    "wan_lora_target",
]


# ---------------------------------------------------------------------- LoRA names
_DIFFUSERS_LORA = [
    (r"blocks\.(\d+)\.attn1\.to_(q|k|v)", r"blocks.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_(q|k|v)", r"blocks.\1.cross_attn.\2"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.attn2\.add_(k|v)_proj", r"blocks.\1.cross_attn.\2_img"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"proj_out", "head.head"),
    (r"condition_embedder\.text_embedder\.linear_(1|2)", "text_embedding.{}"),
    (r"condition_embedder\.time_embedder\.linear_(1|2)", "time_embedding.{}"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
]
_DIFFUSERS_LORA_COMPILED = [(re.compile(pattern), template) for pattern, template in _DIFFUSERS_LORA]


def wan_lora_target(module_name: str) -> _Whole | None:
    """Our (official Wan) layer for a diffusers ``WanTransformer3DModel`` module name, or None."""
    for pattern, template in _DIFFUSERS_LORA_COMPILED:
        match = pattern.fullmatch(module_name)
        if match:
            if "{}" in template:  # linear_1 / linear_2 -> .0 / .2
                return _Whole(template.format(0 if match[1] == "1" else 2))
            return _Whole(match.expand(template))
    return None


# Our (official) layer -> its diffusers module, the inverse of _DIFFUSERS_LORA (1:1: Wan fuses no layers). The
# patterns are also the vocabulary of LoRA-able Wan layers that kohya flat names are read against.
_OFFICIAL_LORA = [
    (r"blocks\.(?P<i>\d+)\.self_attn\.(?P<p>q|k|v)", "blocks.{i}.attn1.to_{p}"),
    (r"blocks\.(?P<i>\d+)\.self_attn\.o", "blocks.{i}.attn1.to_out.0"),
    (r"blocks\.(?P<i>\d+)\.cross_attn\.(?P<p>q|k|v)", "blocks.{i}.attn2.to_{p}"),
    (r"blocks\.(?P<i>\d+)\.cross_attn\.o", "blocks.{i}.attn2.to_out.0"),
    (r"blocks\.(?P<i>\d+)\.cross_attn\.(?P<p>k|v)_img", "blocks.{i}.attn2.add_{p}_proj"),
    (r"blocks\.(?P<i>\d+)\.ffn\.0", "blocks.{i}.ffn.net.0.proj"),
    (r"blocks\.(?P<i>\d+)\.ffn\.2", "blocks.{i}.ffn.net.2"),
    (r"head\.head", "proj_out"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"img_emb\.proj\.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    (r"img_emb\.proj\.3", "condition_embedder.image_embedder.ff.net.2"),
]
_OFFICIAL_LORA_COMPILED = [(re.compile(pattern), template) for pattern, template in _OFFICIAL_LORA]
# kohya/musubi-tuner flat names (blocks_0_cross_attn_k_img): dots become underscores, which makes a flat name
# ambiguous on its own (k_img, self_attn), so it is matched against the vocabulary above instead of split.
_FLAT_LORA_COMPILED = [
    (re.compile(pattern.replace(r"\.", "_")), re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace(r"\.", "."))
    for pattern, _ in _OFFICIAL_LORA
]


def wan_diffusers_lora_name(layer: str) -> str | None:
    """The diffusers ``WanTransformer3DModel`` module a LoRA on our (official) ``layer`` is saved under, or None."""
    for pattern, template in _OFFICIAL_LORA_COMPILED:
        match = pattern.fullmatch(layer)
        if match:
            return template.format(**match.groupdict())
    return None


def wan_layer_from_flat(flat: str) -> str | None:
    """Our layer for a kohya flat name without its ``lora_unet_`` prefix (``blocks_0_self_attn_q``), or None."""
    for pattern, template in _FLAT_LORA_COMPILED:
        match = pattern.fullmatch(flat)
        if match:
            return template.format(**match.groupdict())
    return None


# ---------------------------------------------------------------------- where components come from
_OFFICIAL_FILES = {
    "vae": ("Wan2.2_VAE.safetensors", "Wan2.2_VAE.pth", "Wan2.1_VAE.safetensors", "Wan2.1_VAE.pth"),
    "text_encoder": ("models_t5_umt5-xxl-enc-bf16.safetensors", "models_t5_umt5-xxl-enc-bf16.pth"),
}
_DIFFUSERS_FOLDERS = {
    "transformer": "dit",
    "transformer_2": "dit2",
    "vae": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "image_encoder": "image_encoder",
}
_SPEC_COMPONENTS = {
    "wan.dit": "dit",
    "wan.vae": "vae",
    "wan.vae22": "vae",
    "wan.text_encoder": "text_encoder",
    "wan.image_encoder": "image_encoder",
}


def find_preset(model: str | os.PathLike | None) -> object | None:
    if model is None or Path(model).is_dir():
        return None
    from ds_models_wan.presets import PRESETS, get_preset

    by_id = {getattr(preset, "model_id", "").lower(): preset for preset in PRESETS.values()}
    return by_id.get(str(model).lower()) or get_preset(str(model))


def component_sources(model: object, preset: object | None, download_source: str | None) -> dict[str, object]:
    """Where each component comes from: a preset's ModelConfigs, or the files of a local folder."""
    if preset is not None:
        configs = dict(preset.model_configs(download_source))
        renames = {"dit_high_noise": "dit", "dit_low_noise": "dit2"}
        return {renames.get(name, name): config for name, config in configs.items()}
    if model is None:
        return {}
    folder = Path(model)
    sources: dict[str, object] = {}
    for sub, name in _DIFFUSERS_FOLDERS.items():
        if (folder / sub).is_dir():
            sources[name] = folder / sub
    dits = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if dits:
        sources["dit"] = dits
    for sub, name in (("high_noise_model", "dit"), ("low_noise_model", "dit2")):
        if (folder / sub).is_dir():
            sources[name] = folder / sub
    for name, candidates in _OFFICIAL_FILES.items():
        found = [folder / file for file in candidates if (folder / file).is_file()]
        if found:
            sources[name] = found[0]
    clips = sorted(folder.glob("models_clip_*"))
    if clips:
        sources["image_encoder"] = clips[0]
    if (folder / "google" / "umt5-xxl").is_dir():
        sources["tokenizer"] = folder / "google" / "umt5-xxl"
    return sources


def named_sources(model_configs: Mapping[str, object] | Sequence[object] | None) -> dict[str, object]:
    """Component names for a Wan pipeline's ``model_configs`` (a list is sorted out by detection, headers only)."""
    return base.named_sources(
        model_configs,
        _SPEC_COMPONENTS,
        "Wan",
        lambda folder: "tokenizer" if (folder / "tokenizer_config.json").is_file() else None,
        second={"dit": "dit2"},
    )


def spec_for(component: str, source: object) -> str | None:
    """The spec to load ``component`` with; the VAE's (2.1 or 2.2) comes from detection."""
    if component != "vae":
        return {"dit": "wan.dit", "dit2": "wan.dit"}.get(component, f"wan.{component}")
    from ds_loader import ModelConfig, detect

    paths = source.resolve() if isinstance(source, ModelConfig) else source
    names = {match.spec.name for match in detect(paths)} & {"wan.vae", "wan.vae22"}
    return names.pop() if len(names) == 1 else None


def source_folder(source: object) -> Path:
    from ds_loader import ModelConfig

    paths = source.resolve() if isinstance(source, ModelConfig) else [Path(source)]
    first = Path(paths[0])
    return first if first.is_dir() else first.parent
