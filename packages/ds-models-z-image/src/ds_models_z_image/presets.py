"""The released Z-Image models as data: where each component's files are on ModelScope and Hugging Face.

Every Tongyi-MAI repository is a diffusers-layout folder: the DiT in ``transformer/`` (sharded safetensors with the
official names), the Qwen3-4B text encoder in ``text_encoder/`` (sharded), the FLUX.1 VAE as a diffusers
``AutoencoderKL`` in ``vae/diffusion_pytorch_model.safetensors`` and the Qwen2 tokenizer in ``tokenizer/``;
Omni-Base adds its SigLIP2 image encoder in ``siglip/model.safetensors``. Base and Omni-Base take their text
encoder, VAE and tokenizer from Z-Image-Turbo (the same Qwen3-4B and FLUX.1 VAE), as
DiffSynth-Studio's examples do (``examples/z_image/model_inference/Z-Image.py``, ``Z-Image-Omni-Base.py``). The
ModelScope ids are the Hugging Face ones (DiffSynth-Studio, whose default source is ModelScope, downloads them under
these ids).

Sampling options are in our CFG convention, ``neg + cfg_scale * (pos - neg)`` with CFG off at 1:

- Turbo: 8 steps without CFG. The model card's diffusers example says ``guidance_scale=0.0`` (diffusers' Z-Image
  guidance ``g`` is ``pos + g * (pos - neg)``, off at 0, so ``cfg_scale = g + 1 = 1``) and ``num_inference_steps=9``
  "which actually results in 8 DiT forwards" (older diffusers ended its grid at a zero step it skipped; diffusers
  0.42 and the official pipeline run 8 steps for 8). The official ``src/config/inference.py`` defaults to 8 steps.
- Z-Image (base): 50 steps, ``cfg_scale`` 4, from DiffSynth-Studio's ``Z-Image.py`` example, whose CFG is ours
  (``neg + s * (pos - neg)``), so no conversion.
- Omni-Base: 40 steps, ``cfg_scale`` 4, from DiffSynth-Studio's ``Z-Image-Omni-Base.py`` (our convention too).

All three sample at 1024 x 1024 with the static shift 3 (``scheduler_config.json``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_loader.families import Preset, PresetFile

__all__ = ["COMPONENTS", "OPTIONAL_COMPONENTS", "PRESETS", "ZImagePreset", "get_preset"]

COMPONENTS = ("dit", "vae", "text_encoder", "tokenizer")
OPTIONAL_COMPONENTS = ("image_encoder",)  # Omni-Base's SigLIP2 encoder
TURBO = "Tongyi-MAI/Z-Image-Turbo"
BASE = "Tongyi-MAI/Z-Image"
OMNI_BASE = "Tongyi-MAI/Z-Image-Omni-Base"


@dataclass(frozen=True)
class ZImagePreset(Preset):
    """A released Z-Image model.

    dit_config: the ``ZImageDiTConfig`` preset of its DiT (``"turbo"``, ``"base"``, ``"omni-base"``). ``sampling``
    holds the ``ZImagePipeline`` call options it is run with (``num_inference_steps``, ``cfg_scale`` in our
    convention, ``sigma_shift``, ``height``, ``width``).
    """

    dit_config: str | None = None

    def __post_init__(self) -> None:
        if not set(COMPONENTS) <= set(self.files) <= {*COMPONENTS, *OPTIONAL_COMPONENTS}:
            raise ValueError(
                f"preset {self.name!r}: files must name {COMPONENTS} (and may name {OPTIONAL_COMPONENTS}), got "
                f"{sorted(self.files)}"
            )


def _preset(name: str, repo: str, dit_config: str, steps: int, cfg_scale: float, description: str) -> ZImagePreset:
    files = {
        "dit": PresetFile(repo, "transformer/*.safetensors"),
        "vae": PresetFile(TURBO, "vae/diffusion_pytorch_model.safetensors"),
        "text_encoder": PresetFile(TURBO, "text_encoder/*.safetensors"),
        "tokenizer": PresetFile(TURBO, "tokenizer/"),
    }
    sampling = {
        "num_inference_steps": steps,
        "cfg_scale": cfg_scale,
        "sigma_shift": 3.0,
        "height": 1024,
        "width": 1024,
    }
    if dit_config == "omni-base":
        files["image_encoder"] = PresetFile(repo, "siglip/model.safetensors")
    return ZImagePreset(name, files, sampling, description=description, dit_config=dit_config)


PRESETS: dict[str, ZImagePreset] = {
    preset.name: preset
    for preset in (
        _preset("z-image-turbo", TURBO, "turbo", 8, 1.0, "Z-Image-Turbo: 6B, distilled, 8 steps without CFG"),
        _preset("z-image", BASE, "base", 50, 4.0, "Z-Image: the undistilled 6B foundation model, with CFG"),
        _preset(
            "z-image-omni-base",
            OMNI_BASE,
            "omni-base",
            40,
            4.0,
            "Z-Image-Omni-Base: the foundation model for generation and editing (SigLIP2 reference-image path)",
        ),
    )
}


def get_preset(name: str) -> ZImagePreset:
    """A preset by name or released model id (case-insensitive): ``z-image-turbo``, ``z-image``,
    ``z-image-omni-base``."""
    key = name.strip().lower()
    by_id = {preset.model_id.lower(): preset for preset in PRESETS.values()}
    if key not in PRESETS and key not in by_id:
        raise ValueError(f"unknown Z-Image preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS.get(key) or by_id[key]
