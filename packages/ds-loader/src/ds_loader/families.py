"""Model families as plug-ins: one ``FamilyDescriptor`` per family, found through the ``ds.families`` entry points.

A family package (``ds-models-flux``, ``ds-models-wan``, ...) registers its detection specs under ``ds.models`` and
one descriptor under ``ds.families``. Everything above the family packages (the catalog, pipeline routing, LoRA
files, training, the CLI, the notebook kit, the benchmarks) reads the descriptors and never names a family, so a
new family is new files only. The descriptor names its pipeline and training adapter as import strings
(``"ds_pipelines.flux_image:FluxImagePipeline"``), so a family package never imports the layers above it.

``Preset`` and ``PresetFile`` are the one shape of a released model: component files on ModelScope / Hugging Face
(or in a local folder) and the call options its pipeline is usually run with (``sampling``).
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from ds_loader.config import ModelConfig

__all__ = [
    "FAMILY_ENTRY_POINT_GROUP",
    "KINDS",
    "FamilyDescriptor",
    "FamilyRegistry",
    "LoraNaming",
    "LoraTarget",
    "LoraVocabulary",
    "Preset",
    "PresetFile",
    "TokenLayout",
    "family_registry",
    "find_preset",
    "get_family",
    "list_families",
    "load_object",
    "register_family",
    "schedule_template",
    "unregister_family",
]

logger = logging.getLogger(__name__)

FAMILY_ENTRY_POINT_GROUP = "ds.families"
KINDS = ("image", "video", "audio-video")
_FAMILY_ID = re.compile(r"[a-z0-9][a-z0-9.\-]*")
_IMPORT_STRING = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


# ---------------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class PresetFile:
    """Files of one component: a repository (the same id on ModelScope and Hugging Face unless ``huggingface_id``
    says otherwise) and a glob relative to it (a trailing ``/`` names a folder).

    ``folder``: the files are local, ``pattern`` is relative to this folder and nothing is downloaded (``model_id``
    is then only a label).
    """

    model_id: str
    pattern: str
    huggingface_id: str | None = None
    folder: Path | None = None

    def model_config(self, download_source: str | None = None) -> ModelConfig:
        """A ``ModelConfig`` for these files; ``download_source``: modelscope | huggingface | None (the
        ``DIFFSYNTH_DOWNLOAD_SOURCE`` default). Local files give a ``path=`` config."""
        if self.folder is not None:
            if self.pattern.endswith("/"):
                return ModelConfig(path=self.folder / self.pattern.rstrip("/"))
            paths = sorted(self.folder.glob(self.pattern))
            return ModelConfig(path=paths or self.folder / self.pattern)
        source = (download_source or "").strip().lower()
        model_id = self.huggingface_id if source == "huggingface" and self.huggingface_id else self.model_id
        return ModelConfig(model_id=model_id, origin_file_pattern=self.pattern, download_source=download_source)


@dataclass(frozen=True)
class Preset:
    """A released model: its component files and the call options its pipeline is usually run with.

    files: component name -> files (``dit``, ``vae``, ``text_encoder``, ``tokenizer``, ...). sampling: keyword
    arguments of the family pipeline's ``__call__`` (``num_inference_steps``, ``cfg_scale``, ``height``, ...) that
    differ from the pipeline's defaults; ``from_pretrained`` makes them the loaded pipeline's defaults. Families
    subclass this for what their loaders need (a DiT config name, a model type), never for sampling options.
    """

    name: str
    files: Mapping[str, PresetFile] = field(repr=False)
    sampling: Mapping[str, Any] = field(default_factory=dict, repr=False)
    description: str = ""

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.files)

    @property
    def model_id(self) -> str:
        """The repository this model is released in: that of its (first) DiT."""
        dits = [name for name in self.files if name.startswith("dit")]
        return self.files[(dits or list(self.files))[0]].model_id

    @property
    def is_local(self) -> bool:
        """Its files ship in a local folder (a demo model); nothing to download."""
        return all(file.folder is not None for file in self.files.values())

    def model_config(self, component: str, download_source: str | None = None) -> ModelConfig:
        """The ``ModelConfig`` of one component."""
        if component not in self.files:
            raise ValueError(
                f"preset {self.name!r} has no component {component!r}; it has {', '.join(self.components)}"
            )
        return self.files[component].model_config(download_source)

    def model_configs(self, download_source: str | None = None) -> dict[str, ModelConfig]:
        """Every component's ``ModelConfig``, by component name."""
        return {name: self.model_config(name, download_source) for name in self.components}


# ---------------------------------------------------------------------------------------------- the descriptor
PartSizes = Callable[[int, int], list[int]]  # (out_features, in_features) -> output rows of each part


@dataclass(frozen=True)
class LoraTarget:
    """A LoRA on a foreign (diffusers) module applies to rows ``part`` of our ``layer`` (all rows when ``part`` is
    None; ``part_sizes`` says how the layer's output rows divide), with its two output halves swapped where the
    conventions store them the other way round (FLUX.1's final modulation)."""

    layer: str
    part: int | None = None
    part_sizes: PartSizes | None = None
    swap_halves: bool = False


@dataclass(frozen=True)
class LoraNaming:
    """How a family's LoRA files are named, in every convention the field writes.

    sign: matches a module name (any prefix stripped) that gives this family away, in our, diffusers or kohya flat
    naming (block-level names such as ``double_blocks.3`` or ``blocks_0_self_attn``).
    to_diffusers: our layer -> the diffusers module name(s) a LoRA on it is saved under (several for a fused
    layer such as FLUX.1's qkv), or None. from_diffusers: a diffusers module name -> its ``LoraTarget``, or None.
    from_flat: a kohya flat name without ``lora_unet_`` -> our layer, or None. metadata: the ``ss_*`` and
    ``modelspec.*`` values its trainers write: ``ss_network_module``, ``ss_base_model_version``,
    ``modelspec.architecture``, ``modelspec.implementation``.
    """

    sign: re.Pattern[str]
    to_diffusers: Callable[[str], list[str] | None]
    from_diffusers: Callable[[str], LoraTarget | None]
    from_flat: Callable[[str], str | None]
    metadata: Mapping[str, str]

    def recognises(self, module_name: str) -> bool:
        return self.sign.search(module_name) is not None


@dataclass(frozen=True)
class LoraVocabulary:
    """The LoRA-able Linear layers of a DiT whose module names are diffusers' (Z-Image, Qwen-Image): the naming maps
    of such a family, made from its vocabulary.

    A diffusers LoRA module name is then our layer name, so to and from diffusers are the identity over these layers.
    kohya-style trainers write the same names with dots as underscores (``transformer_blocks_0_attn_to_q``);
    underscores inside names (``to_add_out``, ``feed_forward``) make that ambiguous, so flat names are read against
    the vocabulary. stacks: the repeated block lists (``transformer_blocks``); block_layers: Linear layers inside a
    block, relative to it; top_layers: those outside the blocks. A ``-`` in a name (``all_x_embedder.2-1``) is kept
    by kohya and written as ``_`` by some tools: both spellings are read.
    """

    stacks: tuple[str, ...]
    block_layers: tuple[str, ...]
    top_layers: tuple[str, ...] = ()

    @cached_property
    def _block(self) -> re.Pattern[str]:
        stacks, layers = "|".join(map(re.escape, self.stacks)), "|".join(map(re.escape, self.block_layers))
        return re.compile(rf"(?:{stacks})\.\d+\.(?:{layers})")

    @cached_property
    def _flat_block(self) -> re.Pattern[str]:
        return re.compile(r"(?P<stack>" + "|".join(map(re.escape, self.stacks)) + r")_(?P<i>\d+)_(?P<layer>.+)")

    @cached_property
    def _flat_layers(self) -> tuple[dict[str, str], dict[str, str]]:
        def spellings(layers: tuple[str, ...]) -> dict[str, str]:
            flat = {layer.replace(".", "_"): layer for layer in layers}
            return flat | {name.replace("-", "_"): layer for name, layer in flat.items()}

        return spellings(self.block_layers), spellings(self.top_layers)

    def is_layer(self, name: str) -> bool:
        return name in self.top_layers or self._block.fullmatch(name) is not None

    def to_diffusers(self, layer: str) -> list[str] | None:
        """The diffusers module name a LoRA on our ``layer`` is saved under (the same name), or None."""
        return [layer] if self.is_layer(layer) else None

    def from_diffusers(self, module_name: str) -> LoraTarget | None:
        """Our layer for a diffusers module name (without ``transformer.``), or None."""
        return LoraTarget(module_name) if self.is_layer(module_name) else None

    def from_flat(self, flat: str) -> str | None:
        """Our layer for a kohya flat name without its ``lora_unet_`` prefix, or None."""
        block_layers, top_layers = self._flat_layers
        if flat in top_layers:
            return top_layers[flat]
        match = self._flat_block.fullmatch(flat)
        if match is None or match["layer"] not in block_layers:
            return None
        return f"{match['stack']}.{match['i']}.{block_layers[match['layer']]}"

    def naming(self, sign: re.Pattern[str], metadata: Mapping[str, str]) -> LoraNaming:
        """The family's ``LoraNaming``: these maps, with its ``sign`` and trainer metadata."""
        return LoraNaming(sign, self.to_diffusers, self.from_diffusers, self.from_flat, metadata)


@dataclass(frozen=True)
class TokenLayout:
    """How a preset's output size becomes DiT tokens, for memory estimates.

    tokens_per_pixel: DiT tokens per output pixel of one latent frame (1/256 for an 8x VAE with 2x2 patches).
    temporal_compression: video frames per latent frame (1 for images). text_tokens: prompt tokens that join the
    DiT's sequence (joint attention; 0 where text enters through cross-attention).
    """

    tokens_per_pixel: float
    temporal_compression: int = 1
    text_tokens: int = 0


@dataclass(frozen=True)
class FamilyDescriptor:
    """Everything the shared layers know about one model family.

    id: the one spelling of the family everywhere (``"flux.1"``, ``"wan"``). title: how people write it.
    kind: one of ``KINDS``. presets: name -> ``Preset`` (lower-case names, unique across families).
    pipeline / training_adapter: ``"module:Class"`` import strings, resolved only when used.
    dit_specs: the ``ds.models`` spec names of its DiT(s): a file or folder belongs to the family of its DiT,
    whatever VAE or text encoder it shares with others. component_specs: spec name -> pipeline component, for
    naming a list of files by detection. diffusers_classes: ``_class_name`` values (pipelines and transformers) of
    ``model_index.json`` / ``transformer/config.json`` that identify its diffusers folders.
    build_components: ``preset -> {component: nn.Module}`` of its released models, built in the caller's
    ``torch.device`` context (meta for sizes, a GPU for the memory benchmark); raises ``ValueError`` for a preset
    with no released configuration (a local demo model, sized from its files instead).
    token_layout: ``preset -> TokenLayout``. schedules: sampling-schedule templates by name
    (``ds_models_core.FlowMatchTemplate``). lora: its ``LoraNaming``. default_size: (height, width) its models are
    trained and sampled at when nothing else says. build_tiny_components: as ``build_components`` at the family's
    tiny test sizes (the same architecture and component names), for tests and CPU smoke runs of benchmarks.
    """

    id: str
    title: str
    kind: str
    presets: Mapping[str, Preset]
    pipeline: str
    training_adapter: str
    dit_specs: tuple[str, ...]
    component_specs: Mapping[str, str]
    diffusers_classes: tuple[str, ...]
    build_components: Callable[[Preset], Mapping[str, Any]]
    token_layout: Callable[[Preset], TokenLayout]
    lora: LoraNaming
    schedules: Mapping[str, Any] = field(default_factory=dict)
    default_size: tuple[int, int] = (1024, 1024)
    description: str = ""
    build_tiny_components: Callable[[Preset], Mapping[str, Any]] | None = None

    def __post_init__(self) -> None:
        where = f"family {self.id!r}"
        if not isinstance(self.id, str) or not _FAMILY_ID.fullmatch(self.id):
            raise ValueError(f"family id {self.id!r} must be lower-case letters, digits, '.' and '-'")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind={self.kind!r}; use one of {', '.join(KINDS)}")
        for name in ("pipeline", "training_adapter"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _IMPORT_STRING.fullmatch(value):
                raise ValueError(f"{where}: {name}={value!r} must be an import string 'package.module:Name'")
        if not self.dit_specs:
            raise ValueError(f"{where}: dit_specs must name the spec(s) of its DiT")
        for key, preset in self.presets.items():
            if not isinstance(preset, Preset) or key != preset.name or key != key.lower():
                raise ValueError(f"{where}: presets[{key!r}] must be a Preset named {key!r} in lower case")
        if not isinstance(self.lora, LoraNaming):
            raise TypeError(f"{where}: lora must be a LoraNaming, got {type(self.lora).__name__}")

    def pipeline_class(self) -> type:
        return load_object(self.pipeline)

    def training_adapter_class(self) -> type:
        return load_object(self.training_adapter)

    def get_preset(self, name: str) -> Preset:
        """A preset by name or released model id (case-insensitive)."""
        preset = self.find_preset(name)
        if preset is None:
            raise ValueError(f"unknown {self.title} preset {name!r}; choose one of {', '.join(self.presets)}")
        return preset

    def find_preset(self, name: str | os.PathLike) -> Preset | None:
        key = str(name).strip().lower()
        if key in self.presets:
            return self.presets[key]
        return next((p for p in self.presets.values() if not p.is_local and p.model_id.lower() == key), None)


def load_object(import_string: str) -> Any:
    """``"package.module:Name"`` -> the object, with an error that names the import string."""
    module_name, _, attribute = import_string.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"cannot import {import_string!r}: {error}") from error


# ---------------------------------------------------------------------------------------------- the registry
class FamilyRegistry:
    """Families by id: the installed packages' (``ds.families`` entry points, loaded on first use) plus those
    registered in code (``register_family``: tests, notebooks, a family not yet packaged)."""

    def __init__(self, discover: Callable[[], Iterable[EntryPoint]] | None = None):
        self._discover = discover or (lambda: entry_points(group=FAMILY_ENTRY_POINT_GROUP))
        self._families: dict[str, FamilyDescriptor] = {}
        self._loaded = False

    def register(self, family: FamilyDescriptor, replace: bool = False) -> FamilyDescriptor:
        if not isinstance(family, FamilyDescriptor):
            raise TypeError(f"register_family needs a FamilyDescriptor, got {type(family).__name__}")
        self._load_entry_points()
        known = self._families.get(family.id)
        if known is not None and known is not family and not replace:
            raise ValueError(f"a family with id {family.id!r} is already registered; pass replace=True")
        clashes = {
            name: other.id
            for other in self._families.values()
            if other.id != family.id
            for name in family.presets
            if name in other.presets
        }
        if clashes:
            raise ValueError(f"family {family.id!r}: preset names already used by other families: {clashes}")
        self._families[family.id] = family
        return family

    def unregister(self, family_id: str) -> None:
        self._families.pop(family_id, None)

    def _load_entry_points(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for point in self._discover():
            try:
                family = point.load()
                family = family() if callable(family) and not isinstance(family, FamilyDescriptor) else family
                if not isinstance(family, FamilyDescriptor):
                    raise TypeError(f"it gave a {type(family).__name__}, not a FamilyDescriptor")
            except ModuleNotFoundError as error:  # a family whose own dependencies are missing
                logger.debug("family entry point %s (%s) is not importable: %s", point.name, point.value, error)
                continue
            except Exception as error:  # one broken family must not hide the others
                logger.warning("cannot load family from entry point %s (%s): %s", point.name, point.value, error)
                continue
            if family.id not in self._families:
                self._families[family.id] = family

    def families(self) -> list[FamilyDescriptor]:
        self._load_entry_points()
        return list(self._families.values())

    def get(self, family_id: str) -> FamilyDescriptor:
        self._load_entry_points()
        key = str(family_id).strip().lower()
        if key not in self._families:
            known = ", ".join(self._families) or "none (install a family package such as ds-models-flux)"
            raise ValueError(f"unknown model family {family_id!r}; installed: {known}")
        return self._families[key]


family_registry = FamilyRegistry()


def register_family(family: FamilyDescriptor, replace: bool = False) -> FamilyDescriptor:
    """Add a family in code (its presets, detection routing and LoRA naming become visible everywhere)."""
    return family_registry.register(family, replace=replace)


def unregister_family(family_id: str) -> None:
    family_registry.unregister(family_id)


def list_families() -> list[FamilyDescriptor]:
    """Every installed and registered family, in discovery order."""
    return family_registry.families()


def get_family(family_id: str) -> FamilyDescriptor:
    """A family by id, or a ValueError listing the installed ones."""
    return family_registry.get(family_id)


def find_preset(name: str | os.PathLike | None) -> tuple[FamilyDescriptor, Preset] | None:
    """The family and preset a name or released model id refers to, or None."""
    if name is None:
        return None
    for family in list_families():
        preset = family.find_preset(name)
        if preset is not None:
            return family, preset
    return None


def schedule_template(name: str) -> Any:
    """A sampling-schedule template by name, from whichever family declares it."""
    for family in list_families():
        if name in family.schedules:
            return family.schedules[name]
    known = sorted(name for family in list_families() for name in family.schedules)
    raise ValueError(f"unknown scheduler template {name!r}; known: {', '.join(known) or 'none'}")
