"""The released FLUX.1 models as data: where each component's files are on ModelScope and Hugging Face.

Every FLUX.1 repository of Black Forest Labs holds the DiT as one BFL-format file at its root
(``flux1-dev.safetensors``); dev and schnell also hold the VAE (``ae.safetensors``), the CLIP text encoder
(``text_encoder/model.safetensors``), the T5 encoder (``text_encoder_2/*.safetensors``, sharded) and the
tokenizers (``tokenizer/``, ``tokenizer_2/``). The variants (Krea-dev, Kontext-dev, Fill-dev) take their DiT
from their own repository and the other components from FLUX.1-dev, as DiffSynth-Studio's examples do. The
ModelScope ids mirror the Hugging Face ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ds_loader import ModelConfig

__all__ = ["COMPONENTS", "PRESETS", "FluxFile", "FluxPreset", "get_preset"]

COMPONENTS = ("dit", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
DEV = "black-forest-labs/FLUX.1-dev"


@dataclass(frozen=True)
class FluxFile:
    """Files of one component: a repository (the same id on ModelScope and Hugging Face unless
    ``huggingface_id`` says otherwise) and a glob relative to it (a trailing ``/`` names a folder)."""

    model_id: str
    pattern: str
    huggingface_id: str | None = None

    def model_config(self, download_source: str | None = None) -> ModelConfig:
        """A ``ds_loader.ModelConfig`` for these files; ``download_source``: modelscope | huggingface | None (the
        ``DIFFSYNTH_DOWNLOAD_SOURCE`` default)."""
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
    """A released FLUX.1 model.

    dit_config: the ``FluxDiTConfig`` preset its DiT has. t5_sequence_length: T5 tokens per prompt (512 for the
    dev family, 256 for schnell). guidance: the embedded guidance scale it is usually run with (None: schnell
    has no guidance embedding). steps: typical number of sampling steps.
    """

    name: str
    dit_config: str
    files: dict[str, FluxFile] = field(repr=False)
    t5_sequence_length: int = 512
    guidance: float | None = 3.5
    steps: int = 30

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
    )
}


def get_preset(name: str) -> FluxPreset:
    """A preset by name (case-insensitive): ``flux.1-dev``, ``flux.1-schnell``, ``flux.1-krea-dev``,
    ``flux.1-kontext-dev``, ``flux.1-fill-dev``."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown FLUX.1 preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
