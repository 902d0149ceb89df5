"""The released Wan 2.1 / 2.2 models as data: where each component's files are, and how the reference samples them.

Every Wan-AI repository holds its DiT in the official layout at the root (``diffusion_pytorch_model*.safetensors``,
sharded with an index for the 14B and 5B models; the A14B releases have ``high_noise_model/`` and
``low_noise_model/`` folders instead), the VAE (``Wan2.1_VAE.pth``; ``Wan2.2_VAE.pth`` for TI2V-5B), the umT5
encoder (``models_t5_umt5-xxl-enc-bf16.pth``) and, for the 2.1 image models, the CLIP encoder
(``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``). The tokenizer is always taken from Wan2.1-T2V-1.3B's
``google/umt5-xxl/``, as DiffSynth-Studio does. The ModelScope ids equal the Hugging Face ones.

Sampling facts come from the reference's configs and ``generate.py``: ``sigma_shift`` (``sample_shift``), ``steps``,
``cfg_scale`` (``sample_guide_scale``; A14B: one per expert), ``boundary`` (A14B: the expert switch, as a fraction
of the 1000 training timesteps), ``fps``, the default size and frame count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ds_loader import ModelConfig

__all__ = ["COMPONENTS", "PRESETS", "TOKENIZER_REPO", "WanFile", "WanPreset", "get_preset"]

COMPONENTS = ("dit", "dit_high_noise", "dit_low_noise", "vae", "text_encoder", "tokenizer", "image_encoder")
TOKENIZER_REPO = "Wan-AI/Wan2.1-T2V-1.3B"
DIT_FILES = "diffusion_pytorch_model*.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"


@dataclass(frozen=True)
class WanFile:
    """Files of one component: a repository id (the same on ModelScope and Hugging Face) and a glob relative to it
    (a trailing ``/`` names a folder)."""

    model_id: str
    pattern: str

    def model_config(self, download_source: str | None = None) -> ModelConfig:
        """A ``ds_loader.ModelConfig`` for these files; ``download_source``: modelscope | huggingface | None (the
        ``DIFFSYNTH_DOWNLOAD_SOURCE`` default)."""
        return ModelConfig(model_id=self.model_id, origin_file_pattern=self.pattern, download_source=download_source)


@dataclass(frozen=True)
class WanPreset:
    """A released Wan model.

    files: component name -> files; a subset of ``COMPONENTS``: ``dit`` for single-DiT models, ``dit_high_noise``
        and ``dit_low_noise`` for the A14B experts; ``image_encoder`` only for the 2.1 I2V and FLF2V models.
    model_type: t2v | i2v | flf2v | ti2v. dit_config: the ``WanDiTConfig`` preset of its DiT(s); vae_config: the
        VAE config name ("wan2.1": z 16, 8x spatial; "wan2.2": z 48, 16x spatial).
    boundary: A14B only: the high-noise expert runs while ``timestep >= boundary * 1000``.
    cfg_scale: classifier-free guidance (A14B: of the low-noise expert); cfg_scale_high_noise: A14B's high-noise
        expert's (None otherwise).
    """

    name: str
    model_type: str
    dit_config: str
    vae_config: str
    files: dict[str, WanFile] = field(repr=False)
    height: int = 480
    width: int = 832
    num_frames: int = 81
    fps: int = 16
    steps: int = 50
    sigma_shift: float = 5.0
    cfg_scale: float = 5.0
    cfg_scale_high_noise: float | None = None
    boundary: float | None = None

    def __post_init__(self) -> None:
        unknown = set(self.files) - set(COMPONENTS)
        dits = {"dit"} if self.boundary is None else {"dit_high_noise", "dit_low_noise"}
        if unknown or not dits <= set(self.files) or (self.boundary is None) != ("dit" in self.files):
            raise ValueError(
                f"preset {self.name!r}: files {sorted(self.files)} must name {sorted(dits)} and "
                f"only components of {COMPONENTS}"
            )

    @property
    def model_id(self) -> str:
        """The repository this model is released in (that of its DiT)."""
        return self.files["dit" if "dit" in self.files else "dit_high_noise"].model_id

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if c in self.files)

    def model_config(self, component: str, download_source: str | None = None) -> ModelConfig:
        """The ``ModelConfig`` of one component (one of ``components``)."""
        if component not in self.files:
            raise ValueError(
                f"preset {self.name!r} has no component {component!r}; it has {', '.join(self.components)}"
            )
        return self.files[component].model_config(download_source)

    def model_configs(self, download_source: str | None = None) -> dict[str, ModelConfig]:
        """Every component's ``ModelConfig``, by component name."""
        return {name: self.model_config(name, download_source) for name in self.components}


def _files(repo: str, experts: bool = False, clip: bool = False, vae: str = "Wan2.1_VAE.pth") -> dict[str, WanFile]:
    files = {"vae": WanFile(repo, vae), "text_encoder": WanFile(repo, T5_FILE)}
    files["tokenizer"] = WanFile(TOKENIZER_REPO, "google/umt5-xxl/")
    if experts:
        files["dit_high_noise"] = WanFile(repo, f"high_noise_model/{DIT_FILES}")
        files["dit_low_noise"] = WanFile(repo, f"low_noise_model/{DIT_FILES}")
    else:
        files["dit"] = WanFile(repo, DIT_FILES)
    if clip:
        files["image_encoder"] = WanFile(repo, CLIP_FILE)
    return files


_720P = {"height": 720, "width": 1280}
PRESETS: dict[str, WanPreset] = {
    preset.name: preset
    for preset in (
        WanPreset("wan2.1-t2v-1.3b", "t2v", "wan2.1-t2v-1.3b", "wan2.1", _files("Wan-AI/Wan2.1-T2V-1.3B")),
        WanPreset("wan2.1-t2v-14b", "t2v", "wan2.1-t2v-14b", "wan2.1", _files("Wan-AI/Wan2.1-T2V-14B"), **_720P),
        WanPreset(
            "wan2.1-i2v-14b-480p",
            "i2v",
            "wan2.1-i2v-14b",
            "wan2.1",
            _files("Wan-AI/Wan2.1-I2V-14B-480P", clip=True),
            steps=40,
            sigma_shift=3.0,
        ),
        WanPreset(
            "wan2.1-i2v-14b-720p",
            "i2v",
            "wan2.1-i2v-14b",
            "wan2.1",
            _files("Wan-AI/Wan2.1-I2V-14B-720P", clip=True),
            steps=40,
            **_720P,
        ),
        WanPreset(
            "wan2.1-flf2v-14b-720p",
            "flf2v",
            "wan2.1-flf2v-14b",
            "wan2.1",
            _files("Wan-AI/Wan2.1-FLF2V-14B-720P", clip=True),
            steps=40,
            sigma_shift=16.0,
            **_720P,
        ),
        WanPreset(
            "wan2.2-t2v-a14b",
            "t2v",
            "wan2.2-t2v-a14b",
            "wan2.1",
            _files("Wan-AI/Wan2.2-T2V-A14B", experts=True),
            steps=40,
            sigma_shift=12.0,
            cfg_scale=3.0,
            cfg_scale_high_noise=4.0,
            boundary=0.875,
            **_720P,
        ),
        WanPreset(
            "wan2.2-i2v-a14b",
            "i2v",
            "wan2.2-i2v-a14b",
            "wan2.1",
            _files("Wan-AI/Wan2.2-I2V-A14B", experts=True),
            steps=40,
            cfg_scale=3.5,
            cfg_scale_high_noise=3.5,
            boundary=0.9,
            **_720P,
        ),
        WanPreset(
            "wan2.2-ti2v-5b",
            "ti2v",
            "wan2.2-ti2v-5b",
            "wan2.2",
            _files("Wan-AI/Wan2.2-TI2V-5B", vae="Wan2.2_VAE.pth"),
            height=704,
            width=1280,
            num_frames=121,
            fps=24,
        ),
    )
}


def get_preset(name: str) -> WanPreset:
    """A preset by name (case-insensitive), one of ``PRESETS``: ``wan2.1-t2v-1.3b``, ``wan2.1-t2v-14b``,
    ``wan2.1-i2v-14b-480p``, ``wan2.1-i2v-14b-720p``, ``wan2.1-flf2v-14b-720p``, ``wan2.2-t2v-a14b``,
    ``wan2.2-i2v-a14b``, ``wan2.2-ti2v-5b``."""
    key = name.strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown Wan preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
