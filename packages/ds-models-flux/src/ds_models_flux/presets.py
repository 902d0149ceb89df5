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

from dataclasses import dataclass, field
from pathlib import Path

from ds_loader import ModelConfig

__all__ = ["COMPONENTS", "PRESETS", "FluxFile", "FluxPreset", "get_preset"]

COMPONENTS = ("dit", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
DEV = "black-forest-labs/FLUX.1-dev"
DEMO_DIGITS_FOLDER = Path(__file__).resolve().parent / "demo_digits"


@dataclass(frozen=True)
class FluxFile:
    """Files of one component: a repository (the same id on ModelScope and Hugging Face unless
    ``huggingface_id`` says otherwise) and a glob relative to it (a trailing ``/`` names a folder).

    ``folder``: the files are local, ``pattern`` is relative to this folder and nothing is downloaded
    (``model_id`` is then just a label, the folder's path).
    """

    model_id: str
    pattern: str
    huggingface_id: str | None = None
    folder: Path | None = None

    def model_config(self, download_source: str | None = None) -> ModelConfig:
        """A ``ds_loader.ModelConfig`` for these files; ``download_source``: modelscope | huggingface | None (the
        ``DIFFSYNTH_DOWNLOAD_SOURCE`` default). Local files give a ``path=`` config (missing files: a clear
        ``FileNotFoundError`` naming them)."""
        if self.folder is not None:
            if self.pattern.endswith("/"):
                return ModelConfig(path=self.folder / self.pattern.rstrip("/"))
            paths = sorted(self.folder.glob(self.pattern))
            return ModelConfig(path=paths or self.folder / self.pattern)
        source = (download_source or "").strip().lower()
        model_id = self.huggingface_id if source == "huggingface" and self.huggingface_id else self.model_id
        return ModelConfig(model_id=model_id, origin_file_pattern=self.pattern, download_source=download_source)


def _shared(model_id: str = DEV) -> dict[str, FluxFile]:
    """The VAE, text encoders and tokenizers of a FLUX.1 repository."""
    return {
        "vae": FluxFile(model_id, "ae.safetensors"),
        "text_encoder": FluxFile(model_id, "text_encoder/model.safetensors"),
        "text_encoder_2": FluxFile(model_id, "text_encoder_2/*.safetensors"),
        "tokenizer": FluxFile(model_id, "tokenizer/"),
        "tokenizer_2": FluxFile(model_id, "tokenizer_2/"),
    }


@dataclass(frozen=True)
class FluxPreset:
    """A released FLUX.1 model (or the shipped demo).

    dit_config: the ``FluxDiTConfig`` preset its DiT has (None: not a named config; read it from the file).
    t5_sequence_length: T5 tokens per prompt (512 for the dev family, 256 for schnell). guidance: the embedded
    guidance scale it is usually run with (None: schnell has no guidance embedding). steps: typical number of
    sampling steps. height, width, cfg_scale: the size and classifier-free guidance it is sampled with when
    they differ from the pipeline's defaults (None: the pipeline's 1024 x 1024, no CFG).
    """

    name: str
    dit_config: str | None
    files: dict[str, FluxFile] = field(repr=False)
    t5_sequence_length: int = 512
    guidance: float | None = 3.5
    steps: int = 30
    height: int | None = None
    width: int | None = None
    cfg_scale: float | None = None

    def __post_init__(self) -> None:
        if set(self.files) != set(COMPONENTS):
            raise ValueError(f"preset {self.name!r}: files must name {COMPONENTS}, got {sorted(self.files)}")

    @property
    def model_id(self) -> str:
        """The repository this model is released in (that of its DiT)."""
        return self.files["dit"].model_id

    def model_config(self, component: str, download_source: str | None = None) -> ModelConfig:
        """The ``ModelConfig`` of one component (one of ``COMPONENTS``)."""
        if component not in self.files:
            raise ValueError(f"preset {self.name!r} has no component {component!r}; choose one of {COMPONENTS}")
        return self.files[component].model_config(download_source)

    def model_configs(self, download_source: str | None = None) -> dict[str, ModelConfig]:
        """Every component's ``ModelConfig``, by component name."""
        return {name: self.model_config(name, download_source) for name in COMPONENTS}


def _local_preset(name: str, folder: Path, dit_file: str, **kwargs) -> FluxPreset:
    """A preset whose files sit in a local folder laid out like an official FLUX.1 repository."""
    label = str(folder)
    files = {name: FluxFile(label, file.pattern, folder=folder) for name, file in _shared(label).items()}
    return FluxPreset(name, None, {"dit": FluxFile(label, dit_file, folder=folder), **files}, **kwargs)


def _preset(name: str, repo: str, dit_file: str, dit_config: str, shared_from: str = DEV, **kwargs) -> FluxPreset:
    return FluxPreset(name, dit_config, {"dit": FluxFile(repo, dit_file), **_shared(shared_from)}, **kwargs)


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
    """A preset by name (case-insensitive): ``flux.1-dev``, ``flux.1-schnell``, ``flux.1-krea-dev``,
    ``flux.1-kontext-dev``, ``flux.1-fill-dev``, ``demo-digits``."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown FLUX.1 preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
