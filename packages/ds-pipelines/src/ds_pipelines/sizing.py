"""The released models of every installed family and their sizes, read from the family registry.

Each family's descriptor builds its released components on the meta device (no weights, no download); parameter
counts and the bytes ds-vram stores come from ``ds_vram.estimate_weights``. A preset with no released configuration
(a demo shipped as files) is sized from its checkpoint headers. Nothing here names a family.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ds_loader.families import FamilyDescriptor, Preset, list_families
from ds_vram import estimate_weights

__all__ = ["ComponentSize", "ModelEntry", "clear_model_cache", "get_model_entry", "list_models"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComponentSize:
    """One model of a pipeline: parameters, bytes in bf16 and in FP8 storage, the largest layer in bf16."""

    name: str
    parameters: int
    bf16_bytes: int
    fp8_bytes: int
    largest_layer_bytes: int


@dataclass(frozen=True)
class ModelEntry:
    """A released model as the CLI and notebooks list it.

    family: the family id. kind: the family's kind (``"image"``, ``"video"``, ``"audio-video"``).
    height/width/frames/steps: what it is usually run at (frames 1 for images). tokens_per_pixel: DiT tokens per
    output pixel and latent frame (1/256 for 16-pixel patches). temporal_compression: video frames per latent frame
    (1 for images). text_tokens: tokens added to the DiT sequence by the prompt (joint attention; 0 where text enters
    through cross-attention). widest_layer: the largest Linear output width of the DiT (drives activation memory).
    """

    name: str
    family: str
    kind: str
    model_id: str
    pipeline: str
    components: tuple[ComponentSize, ...] = field(repr=False)
    height: int = 1024
    width: int = 1024
    frames: int = 1
    steps: int = 30
    tokens_per_pixel: float = 1 / 256
    temporal_compression: int = 1
    text_tokens: int = 0
    widest_layer: int = 0

    @property
    def parameters(self) -> int:
        return sum(c.parameters for c in self.components)

    @property
    def bf16_bytes(self) -> int:
        return sum(c.bf16_bytes for c in self.components)


def component_size(name: str, module: nn.Module) -> ComponentSize:
    bf16 = estimate_weights(module)
    fp8 = estimate_weights(module, "fp8")
    return ComponentSize(name, bf16.parameter_count, bf16.total_bytes, fp8.total_bytes, bf16.largest_layer_bytes)


def _widest_linear(module: nn.Module) -> int:
    return max((m.out_features for m in module.modules() if isinstance(m, nn.Linear)), default=0)


def _sampling(family: FamilyDescriptor, preset: Preset) -> dict[str, object]:
    """The call options a preset runs with: its pipeline's defaults, overlaid with the preset's own."""
    try:
        defaults = dict(getattr(family.pipeline_class(), "default_options", {}))
    except ImportError as error:  # the pipeline's own extras are missing: the preset's values still size it
        logger.debug("cannot import %s: %s", family.pipeline, error)
        defaults = {}
    return {**defaults, **{k: v for k, v in preset.sampling.items() if v is not None}}


def _entry(family: FamilyDescriptor, preset: Preset, components: tuple[ComponentSize, ...], widest: int) -> ModelEntry:
    sampling = _sampling(family, preset)
    layout = family.token_layout(preset)
    frames = sampling.get("num_frames") if family.kind != "image" else 1
    return ModelEntry(
        preset.name,
        family.id,
        family.kind,
        preset.model_id,
        family.pipeline.rpartition(":")[2],
        components,
        height=int(sampling.get("height") or family.default_size[0]),
        width=int(sampling.get("width") or family.default_size[1]),
        frames=int(frames or 1),
        steps=int(sampling.get("num_inference_steps") or 30),
        tokens_per_pixel=layout.tokens_per_pixel,
        temporal_compression=layout.temporal_compression,
        text_tokens=layout.text_tokens,
        widest_layer=widest,
    )


def _sized(family: FamilyDescriptor, preset: Preset) -> ModelEntry:
    try:
        with torch.device("meta"):
            modules = dict(family.build_components(preset))
    except ValueError:  # no released configuration (a demo shipped as files): size it from its headers
        return _entry(family, preset, _sizes_from_files(preset), 0)
    components = tuple(component_size(name, module) for name, module in modules.items())
    dit = next((module for name, module in modules.items() if name.startswith("dit")), None)
    return _entry(family, preset, components, _widest_linear(dit) if dit is not None else 0)


def _local_paths(preset: Preset) -> list[Path] | None:
    paths = []
    for config in preset.model_configs().values():
        path = getattr(config, "path", None)
        if path is None:
            return None
        paths.extend(Path(p) for p in ([path] if isinstance(path, (str, Path)) else path))
    return paths or None


def _sizes_from_files(preset: Preset) -> tuple[ComponentSize, ...]:
    """A preset whose files are local: sizes from its checkpoint headers (nothing when they are not built yet)."""
    from ds_loader import inspect_checkpoint

    paths = _local_paths(preset)
    if not paths or not all(p.exists() for p in paths):
        return ()
    components = []
    for path in paths:
        if path.is_dir() and path.name.startswith("tokenizer"):
            continue
        for entry in inspect_checkpoint(path).entries:
            stored = entry.parameter_count * 2  # bf16; no layer structure in headers: conservative
            name = entry.component or path.stem
            components.append(ComponentSize(name, entry.parameter_count, stored, stored, stored))
    return tuple(components)


_CACHE: dict[tuple[str, int], list[ModelEntry]] = {}


def clear_model_cache() -> None:
    """Forget computed sizes (after registering or replacing a family in a long-lived process)."""
    _CACHE.clear()


def list_models(families: tuple[str, ...] | None = None) -> list[ModelEntry]:
    """Every preset of every installed or registered family (``families``: only those ids)."""
    entries = []
    for family in list_families():
        if families is not None and family.id not in families:
            continue
        key = (family.id, id(family))  # a re-registered family is sized anew
        if key not in _CACHE:
            _CACHE[key] = [_sized(family, preset) for preset in family.presets.values()]
        entries.extend(_CACHE[key])
    return entries


def get_model_entry(name: str) -> ModelEntry:
    """A listed model by preset name or model id (case-insensitive)."""
    key = name.strip().lower()
    entries = list_models()
    for entry in entries:
        if key in (entry.name.lower(), entry.model_id.lower()):
            return entry
    known = ", ".join(entry.name for entry in entries)
    raise ValueError(f"unknown model {name!r}; known presets: {known}")
