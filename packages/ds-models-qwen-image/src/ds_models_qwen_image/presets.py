"""The released Qwen-Image models as data: where each component's files are on ModelScope and Hugging Face.

Every Qwen repository is a diffusers folder (the official layout and diffusers' are the same here): the DiT in
``transformer/`` (sharded safetensors with diffusers' ``QwenImageTransformer2DModel`` names), Qwen2.5-VL-7B in
``text_encoder/`` (sharded, the older transformers key layout), the Wan 2.1 VAE as ``AutoencoderKLQwenImage`` in
``vae/``, the Qwen2 tokenizer in ``tokenizer/``, and in the Edit repositories the VL ``processor/``. Every release
shares the text encoder and VAE, so all presets take them, and the tokenizer, from ``Qwen/Qwen-Image``, and the
processor from ``Qwen/Qwen-Image-Edit``, as DiffSynth-Studio's examples do
(``examples/qwen_image/model_inference/*.py``): one download serves every release. The ModelScope ids are the
Hugging Face ones.

Sampling options, in our CFG convention ``neg + cfg_scale * (pos - neg)`` (diffusers' ``true_cfg_scale``, the same
formula, so no conversion), from the model cards' diffusers examples:

- Qwen-Image, Qwen-Image-2512: 50 steps, ``true_cfg_scale=4.0``, 1328 x 1328 (the cards' 1:1 size);
- Qwen-Image-Edit: 50 steps, ``true_cfg_scale=4.0``;
- Qwen-Image-Edit-2509, -2511: 40 steps, ``true_cfg_scale=4.0`` (and ``guidance_scale=1.0``, which these models
  ignore: they have no guidance embedding).

The edit presets leave the size to the pipeline (the last edit image's aspect ratio at about one megapixel). All use
the ``"qwen-image"`` schedule; the Lightning LoRAs (``LIGHTNING_LORAS``) switch to ``"qwen-image-lightning"``.

Extras that are not presets (no preset names a LoRA or a ControlNet; load them by file): ``CONTROLNETS`` (the
blockwise ControlNets of DiffSynth-Studio and InstantX's Union) and ``LIGHTNING_LORAS`` (lightx2v's distilled
LoRAs, with the sampling options they need).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ds_loader.families import Preset, PresetFile

__all__ = [
    "COMPONENTS",
    "CONTROLNETS",
    "LIGHTNING_LORAS",
    "OPTIONAL_COMPONENTS",
    "PRESETS",
    "QwenImageExtra",
    "QwenImagePreset",
    "get_preset",
]

COMPONENTS = ("dit", "vae", "text_encoder", "tokenizer")
OPTIONAL_COMPONENTS = ("processor",)  # the edit models' VL processor
BASE = "Qwen/Qwen-Image"
EDIT = "Qwen/Qwen-Image-Edit"


@dataclass(frozen=True)
class QwenImagePreset(Preset):
    """A released Qwen-Image model.

    dit_config: the ``QwenImageDiTConfig.preset`` name of its DiT (Edit-2511's sets ``zero_cond_t``, which its
    weights cannot show). edit_variant: None for text-to-image, ``"edit"`` (Qwen-Image-Edit's one-image template)
    or ``"edit-plus"`` (Edit-2509/2511: ``Picture i:`` labels, several images), as ``encode_edit_prompt`` takes it.
    ``sampling`` holds the ``QwenImagePipeline`` call options it is run with.
    """

    dit_config: str | None = None
    edit_variant: str | None = None

    def __post_init__(self) -> None:
        if not set(COMPONENTS) <= set(self.files) <= {*COMPONENTS, *OPTIONAL_COMPONENTS}:
            raise ValueError(
                f"preset {self.name!r}: files must name {COMPONENTS} (and may name {OPTIONAL_COMPONENTS}), got "
                f"{sorted(self.files)}"
            )
        if self.edit_variant not in (None, "edit", "edit-plus"):
            raise ValueError(
                f"preset {self.name!r}: edit_variant={self.edit_variant!r}; use None, 'edit', 'edit-plus'"
            )
        if self.edit_variant is not None and "processor" not in self.files:
            raise ValueError(f"preset {self.name!r}: an edit model needs the VL processor (files['processor'])")


def _preset(name: str, repo: str, steps: int, description: str, edit_variant: str | None = None) -> QwenImagePreset:
    files = {
        "dit": PresetFile(repo, "transformer/*.safetensors"),
        "vae": PresetFile(BASE, "vae/diffusion_pytorch_model.safetensors"),
        "text_encoder": PresetFile(BASE, "text_encoder/*.safetensors"),
        "tokenizer": PresetFile(BASE, "tokenizer/"),
    }
    sampling: dict[str, Any] = {"num_inference_steps": steps, "cfg_scale": 4.0, "schedule": "qwen-image"}
    if edit_variant is None:
        sampling |= {"height": 1328, "width": 1328}
    else:
        files["processor"] = PresetFile(EDIT, "processor/")
    dit_config = "qwen-image-edit-2511" if name == "qwen-image-edit-2511" else "qwen-image"
    return QwenImagePreset(
        name, files, sampling, description=description, dit_config=dit_config, edit_variant=edit_variant
    )


PRESETS: dict[str, QwenImagePreset] = {
    preset.name: preset
    for preset in (
        _preset("qwen-image", BASE, 50, "Qwen-Image: the 20B MMDiT, strong at rendering text, with true CFG"),
        _preset("qwen-image-2512", "Qwen/Qwen-Image-2512", 50, "Qwen-Image-2512: the December 2025 update"),
        _preset("qwen-image-edit", EDIT, 50, "Qwen-Image-Edit: instruction editing of one image", "edit"),
        _preset(
            "qwen-image-edit-2509",
            "Qwen/Qwen-Image-Edit-2509",
            40,
            "Qwen-Image-Edit-2509: editing from one to three reference images",
            "edit-plus",
        ),
        _preset(
            "qwen-image-edit-2511",
            "Qwen/Qwen-Image-Edit-2511",
            40,
            "Qwen-Image-Edit-2511: multi-image editing, reference tokens at t = 0 (zero_cond_t)",
            "edit-plus",
        ),
    )
}


def get_preset(name: str) -> QwenImagePreset:
    """A preset by name or released model id (case-insensitive): ``qwen-image``, ``Qwen/Qwen-Image-Edit-2509``..."""
    key = name.strip().lower()
    by_id = {preset.model_id.lower(): preset for preset in PRESETS.values()}
    if key not in PRESETS and key not in by_id:
        raise ValueError(f"unknown Qwen-Image preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS.get(key) or by_id[key]


# ---------------------------------------------------------------------------------------------- extras
@dataclass(frozen=True)
class QwenImageExtra:
    """A released add-on file: a ControlNet or a LoRA.

    file: where it is. kind: ``"blockwise-controlnet"``, ``"controlnet-union"`` or ``"lora"``. presets: the presets
    it was trained for. sampling: call options it needs (a distilled LoRA's steps, CFG off, its schedule).
    """

    name: str
    file: PresetFile
    kind: str
    presets: tuple[str, ...]
    sampling: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""


_T2I = ("qwen-image", "qwen-image-2512")
CONTROLNETS: dict[str, QwenImageExtra] = {
    extra.name: extra
    for extra in (
        *(
            QwenImageExtra(
                f"blockwise-{kind.lower()}",
                PresetFile(f"DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-{kind}", "model.safetensors"),
                "blockwise-controlnet",
                _T2I,
                description=f"DiffSynth-Studio's blockwise ControlNet for {what}",
            )
            for kind, what in (
                ("Canny", "Canny edge maps"),
                ("Depth", "depth maps"),
                ("Inpaint", "inpainting (the image and its mask: 4 extra input channels)"),
            )
        ),
        QwenImageExtra(
            "instantx-union",
            PresetFile("InstantX/Qwen-Image-ControlNet-Union", "diffusion_pytorch_model.safetensors"),
            "controlnet-union",
            _T2I,
            description="InstantX's ControlNet Union (canny, soft edge, depth, pose): QwenImageControlNetModel",
        ),
    )
}

# lightx2v's distilled LoRAs: CFG off, few steps, the static shift 3 of their scheduler config (exponential shifting
# with base_shift = max_shift = ln 3, no terminal stretch).
_LIGHTNING = "lightx2v/Qwen-Image-Lightning"
LIGHTNING_LORAS: dict[str, QwenImageExtra] = {
    extra.name: extra
    for extra in (
        QwenImageExtra(
            f"qwen-image-lightning-{steps}steps",
            PresetFile(_LIGHTNING, f"Qwen-Image-Lightning-{steps}steps-{version}.safetensors"),
            "lora",
            _T2I,
            {"num_inference_steps": steps, "cfg_scale": 1.0, "schedule": "qwen-image-lightning"},
            f"Qwen-Image-Lightning {version}: {steps} steps without CFG",
        )
        for steps, version in ((8, "V1.1"), (4, "V1.0"))
    )
}
LIGHTNING_LORAS["qwen-image-edit-2511-lightning-4steps"] = QwenImageExtra(
    "qwen-image-edit-2511-lightning-4steps",
    PresetFile(
        "lightx2v/Qwen-Image-Edit-2511-Lightning", "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"
    ),
    "lora",
    ("qwen-image-edit-2511",),
    {"num_inference_steps": 4, "cfg_scale": 1.0, "schedule": "qwen-image-lightning"},
    "Qwen-Image-Edit-2511-Lightning: 4 steps without CFG (DiffSynth-Studio's Qwen-Image-Edit-2511-Lightning.py)",
)
