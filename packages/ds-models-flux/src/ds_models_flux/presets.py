"""The released FLUX.1 models as data: where each component's files are on ModelScope and Hugging Face.

Every FLUX.1 repository of Black Forest Labs holds the DiT as one BFL-format file at its root
(``flux1-dev.safetensors``); dev and schnell also hold the VAE (``ae.safetensors``), the CLIP text encoder
(``text_encoder/model.safetensors``), the T5 encoder (``text_encoder_2/*.safetensors``, sharded) and the
tokenizers (``tokenizer/``, ``tokenizer_2/``). The variants (Krea-dev, Kontext-dev, Fill-dev) take their DiT
from their own repository and the other components from FLUX.1-dev, as DiffSynth-Studio's examples do. The
ModelScope ids mirror the Hugging Face ones.

``demo-digits`` is not a release but a tiny FLUX.1 trained on scikit-learn's 8x8 digits by
``examples/demo_digits/train.py``; its files ship inside this package (``ds_models_flux/demo_digits/``, laid out
like an official repository), so it loads offline. A preset may point at local files in this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ds_loader.families import Preset, PresetFile

__all__ = ["COMPONENTS", "PRESETS", "FluxFile", "FluxPreset", "get_preset"]

COMPONENTS = ("dit", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
DEV = "black-forest-labs/FLUX.1-dev"
DEMO_DIGITS_FOLDER = Path(__file__).resolve().parent / "demo_digits"
FluxFile = PresetFile  # the shared shape; the name stays for code written against it


def _shared(model_id: str = DEV) -> dict[str, PresetFile]:
    """The VAE, text encoders and tokenizers of a FLUX.1 repository."""
    return {
        "vae": PresetFile(model_id, "ae.safetensors"),
        "text_encoder": PresetFile(model_id, "text_encoder/model.safetensors"),
        "text_encoder_2": PresetFile(model_id, "text_encoder_2/*.safetensors"),
        "tokenizer": PresetFile(model_id, "tokenizer/"),
        "tokenizer_2": PresetFile(model_id, "tokenizer_2/"),
    }


@dataclass(frozen=True)
class FluxPreset(Preset):
    """A released FLUX.1 model (or the shipped demo).

    dit_config: the ``FluxDiTConfig`` preset its DiT has (None: not a named config; read it from the file).
    t5_sequence_length: T5 tokens per prompt (512 for the dev family, 256 for schnell). ``sampling`` holds the
    ``FluxImagePipeline`` call options it is usually run with: ``num_inference_steps``, ``embedded_guidance``
    (absent for schnell, which has no guidance embedding), and ``height``/``width``/``cfg_scale`` where they
    differ from the pipeline's 1024 x 1024 without CFG.
    """

    dit_config: str | None = None
    t5_sequence_length: int = 512

    def __post_init__(self) -> None:
        if set(self.files) != set(COMPONENTS):
            raise ValueError(f"preset {self.name!r}: files must name {COMPONENTS}, got {sorted(self.files)}")

    @property
    def steps(self) -> int:
        return self.sampling.get("num_inference_steps", 30)

    @property
    def guidance(self) -> float | None:
        return self.sampling.get("embedded_guidance")

    @property
    def height(self) -> int | None:
        return self.sampling.get("height")

    @property
    def width(self) -> int | None:
        return self.sampling.get("width")

    @property
    def cfg_scale(self) -> float | None:
        return self.sampling.get("cfg_scale")


def _sampling(guidance: float | None = 3.5, steps: int = 30, **options: object) -> dict[str, object]:
    return {"num_inference_steps": steps, "embedded_guidance": guidance, **options}


def _local_preset(name: str, folder: Path, dit_file: str, t5_sequence_length: int, **sampling) -> FluxPreset:
    """A preset whose files sit in a local folder laid out like an official FLUX.1 repository."""
    label = str(folder)
    files = {name: PresetFile(label, file.pattern, folder=folder) for name, file in _shared(label).items()}
    files = {"dit": PresetFile(label, dit_file, folder=folder), **files}
    sampling = {key: value for key, value in _sampling(**sampling).items() if value is not None}
    return FluxPreset(name, files, sampling, t5_sequence_length=t5_sequence_length)


def _preset(
    name: str,
    repo: str,
    dit_file: str,
    dit_config: str,
    shared_from: str = DEV,
    t5_sequence_length: int = 512,
    **sampling,
) -> FluxPreset:
    files = {"dit": PresetFile(repo, dit_file), **_shared(shared_from)}
    sampling = {key: value for key, value in _sampling(**sampling).items() if value is not None}
    return FluxPreset(name, files, sampling, dit_config=dit_config, t5_sequence_length=t5_sequence_length)


SCHNELL = "black-forest-labs/FLUX.1-schnell"
PRESETS: dict[str, FluxPreset] = {
    preset.name: preset
    for preset in (
        _preset("flux.1-dev", DEV, "flux1-dev.safetensors", "dev"),
        _preset(
            "flux.1-schnell",
            SCHNELL,
            "flux1-schnell.safetensors",
            "schnell",
            shared_from=SCHNELL,
            t5_sequence_length=256,
            guidance=None,
            steps=4,
        ),
        _preset("flux.1-krea-dev", "black-forest-labs/FLUX.1-Krea-dev", "flux1-krea-dev.safetensors", "krea_dev"),
        _preset(
            "flux.1-kontext-dev",
            "black-forest-labs/FLUX.1-Kontext-dev",
            "flux1-kontext-dev.safetensors",
            "kontext_dev",
            guidance=2.5,
        ),
        _preset(
            "flux.1-fill-dev",
            "black-forest-labs/FLUX.1-Fill-dev",
            "flux1-fill-dev.safetensors",
            "fill_dev",
            guidance=30.0,
            steps=50,
        ),
        # examples/demo_digits/train.py writes these files and prints the sampling settings it was checked with.
        _local_preset(
            "demo-digits",
            DEMO_DIGITS_FOLDER,
            "flux1-demo-digits.safetensors",
            t5_sequence_length=8,
            guidance=None,
            steps=12,
            height=32,
            width=32,
            cfg_scale=2.0,
        ),
    )
}


def get_preset(name: str) -> FluxPreset:
    """A preset by name or released model id (case-insensitive): ``flux.1-dev``, ``flux.1-schnell``,
    ``flux.1-krea-dev``, ``flux.1-kontext-dev``, ``flux.1-fill-dev``, ``demo-digits``."""
    key = name.strip().lower()
    by_id = {preset.model_id.lower(): preset for preset in PRESETS.values() if not preset.is_local}
    if key not in PRESETS and key not in by_id:
        raise ValueError(f"unknown FLUX.1 preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS.get(key) or by_id[key]
