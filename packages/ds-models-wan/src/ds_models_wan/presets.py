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

from dataclasses import dataclass

from ds_loader.families import Preset, PresetFile

__all__ = ["COMPONENTS", "PRESETS", "TOKENIZER_REPO", "WanFile", "WanPreset", "get_preset"]

COMPONENTS = ("dit", "dit_high_noise", "dit_low_noise", "vae", "text_encoder", "tokenizer", "image_encoder")
TOKENIZER_REPO = "Wan-AI/Wan2.1-T2V-1.3B"
DIT_FILES = "diffusion_pytorch_model*.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
WanFile = PresetFile  # the shared shape; the name stays for code written against it


@dataclass(frozen=True)
class WanPreset(Preset):
    """A released Wan model.

    files: component name -> files; a subset of ``COMPONENTS``: ``dit`` for single-DiT models, ``dit_high_noise``
        and ``dit_low_noise`` for the A14B experts; ``image_encoder`` only for the 2.1 I2V and FLF2V models.
    model_type: t2v | i2v | flf2v | ti2v. dit_config: the ``WanDiTConfig`` preset of its DiT(s); vae_config: the
        VAE config name ("wan2.1": z 16, 8x spatial; "wan2.2": z 48, 16x spatial). fps: its native frame rate.
    boundary: A14B only: the high-noise expert runs while ``timestep >= boundary * 1000``.
    sampling: ``WanVideoPipeline`` call options: ``height``, ``width``, ``num_frames``, ``num_inference_steps``,
        ``sigma_shift`` (the reference's ``sample_shift``), ``cfg_scale`` (A14B: of the low-noise expert) and
        ``cfg_scale_high_noise`` (A14B's high-noise expert's).
    """

    model_type: str = "t2v"
    dit_config: str = ""
    vae_config: str = "wan2.1"
    fps: int = 16
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
    def components(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if c in self.files)

    @property
    def height(self) -> int:
        return self.sampling["height"]

    @property
    def width(self) -> int:
        return self.sampling["width"]

    @property
    def num_frames(self) -> int:
        return self.sampling["num_frames"]

    @property
    def steps(self) -> int:
        return self.sampling["num_inference_steps"]

    @property
    def sigma_shift(self) -> float:
        return self.sampling["sigma_shift"]

    @property
    def cfg_scale(self) -> float:
        return self.sampling["cfg_scale"]

    @property
    def cfg_scale_high_noise(self) -> float | None:
        return self.sampling.get("cfg_scale_high_noise")


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


def _preset(
    name: str,
    model_type: str,
    dit_config: str,
    vae_config: str,
    files: dict[str, WanFile],
    *,
    fps: int = 16,
    boundary: float | None = None,
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    steps: int = 50,
    sigma_shift: float = 5.0,
    cfg_scale: float = 5.0,
    cfg_scale_high_noise: float | None = None,
) -> WanPreset:
    sampling = {
        "height": height,
        "width": width,
        "num_frames": num_frames,
        "num_inference_steps": steps,
        "sigma_shift": sigma_shift,
        "cfg_scale": cfg_scale,
    }
    if cfg_scale_high_noise is not None:
        sampling["cfg_scale_high_noise"] = cfg_scale_high_noise
    return WanPreset(
        name,
        files,
        sampling,
        model_type=model_type,
        dit_config=dit_config,
        vae_config=vae_config,
        fps=fps,
        boundary=boundary,
    )


_720P = {"height": 720, "width": 1280}
PRESETS: dict[str, WanPreset] = {
    preset.name: preset
    for preset in (
        _preset("wan2.1-t2v-1.3b", "t2v", "wan2.1-t2v-1.3b", "wan2.1", _files("Wan-AI/Wan2.1-T2V-1.3B")),
        _preset("wan2.1-t2v-14b", "t2v", "wan2.1-t2v-14b", "wan2.1", _files("Wan-AI/Wan2.1-T2V-14B"), **_720P),
        _preset(
            "wan2.1-i2v-14b-480p",
            "i2v",
            "wan2.1-i2v-14b",
            "wan2.1",
            _files("Wan-AI/Wan2.1-I2V-14B-480P", clip=True),
            steps=40,
            sigma_shift=3.0,
        ),
        _preset(
            "wan2.1-i2v-14b-720p",
            "i2v",
            "wan2.1-i2v-14b",
            "wan2.1",
            _files("Wan-AI/Wan2.1-I2V-14B-720P", clip=True),
            steps=40,
            **_720P,
        ),
        _preset(
            "wan2.1-flf2v-14b-720p",
            "flf2v",
            "wan2.1-flf2v-14b",
            "wan2.1",
            _files("Wan-AI/Wan2.1-FLF2V-14B-720P", clip=True),
            steps=40,
            sigma_shift=16.0,
            **_720P,
        ),
        _preset(
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
        _preset(
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
        _preset(
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
    by_id = {preset.model_id.lower(): preset for preset in PRESETS.values()}
    if key not in PRESETS and key not in by_id:
        raise ValueError(f"unknown Wan preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS.get(key) or by_id[key]
