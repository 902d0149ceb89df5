"""Where a Wan pipeline's components come from: Wan-AI and diffusers folders, detected files. (The LoRA name maps
live with the family, in ``ds_models_wan.lora``.)"""

from __future__ import annotations

from pathlib import Path

from .base import subfolder_sources

__all__ = [
    "folder_sources",
    "spec_for",
]


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


def folder_sources(folder: Path) -> dict[str, object]:
    """The components of a local folder laid out like a Wan-AI repository or a diffusers one."""
    sources: dict[str, object] = dict(subfolder_sources(folder, _DIFFUSERS_FOLDERS))
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


def spec_for(component: str, source: object) -> str | None:
    """The spec to load ``component`` with; the VAE's (2.1 or 2.2) comes from detection."""
    if component != "vae":
        return {"dit": "wan.dit", "dit2": "wan.dit"}.get(component, f"wan.{component}")
    from ds_loader import ModelConfig, detect

    paths = source.resolve() if isinstance(source, ModelConfig) else source
    names = {match.spec.name for match in detect(paths)} & {"wan.vae", "wan.vae22"}
    return names.pop() if len(names) == 1 else None
