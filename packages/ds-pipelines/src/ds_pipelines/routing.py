"""Which family, pipeline and call defaults a model name or local path stands for, and downloading a preset.

A preset name or released model id is looked up in the family registry. A local folder or file belongs to the
family of its DiT: a diffusers folder says so in ``transformer/config.json`` (or ``model_index.json``), anything
else is recognised by ds-loader detection (headers only) against each family's ``dit_specs``. A VAE or text encoder
that several families share (Z-Image uses FLUX.1's VAE, Qwen-Image a Wan-2.1-style one) decides nothing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ds_loader.families import FamilyDescriptor, Preset, find_preset, list_families

__all__ = ["DEFAULT_MODEL", "download_model", "family_for", "pipeline_for", "preset_defaults", "resolve_preset"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "demo-digits"
_DETECTION_FILE_LIMIT = 16  # headers only; enough to find a DiT among a folder's files


def resolve_preset(model: object) -> tuple[FamilyDescriptor, Preset] | None:
    """The family and preset a name or released model id refers to; None for paths, mappings and unknown names."""
    if not isinstance(model, str | os.PathLike) or Path(model).exists():
        return None
    return find_preset(str(model))


def _family_of_diffusers_folder(path: Path) -> FamilyDescriptor | None:
    for name in ("transformer/config.json", "model_index.json"):  # the DiT's own class first
        try:
            class_name = json.loads((path / name).read_text()).get("_class_name", "")
        except (OSError, ValueError, AttributeError):
            continue
        for family in list_families():
            if class_name in family.diffusers_classes:
                return family
    return None


def _candidate_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*/*.safetensors"))
    files += sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
    return files[:_DETECTION_FILE_LIMIT]


def _family_of_files(path: Path) -> FamilyDescriptor | None:
    from ds_loader import LoaderError, detect

    if path.is_dir():
        family = _family_of_diffusers_folder(path)
        if family is not None:
            return family
    detected: set[str] = set()
    for file in _candidate_files(path):
        try:
            detected.update(match.spec.name for match in detect(file))
        except (LoaderError, OSError, ValueError):
            continue
    owners = [family for family in list_families() if detected & set(family.dit_specs)]
    if len(owners) > 1:
        names = ", ".join(family.id for family in owners)
        raise ValueError(f"{path}: holds the DiTs of several families ({names}); point at one model's folder or file")
    return owners[0] if owners else None


def family_for(model: str | os.PathLike | None) -> FamilyDescriptor:
    """The family of a preset name, a released model id, or a local folder or file (decided by its DiT).

    None stands for ``DEFAULT_MODEL``. Raises ValueError naming ``model`` when nothing recognises it.
    """
    model = DEFAULT_MODEL if model is None else model
    found = resolve_preset(model)
    if found is not None:
        return found[0]
    path = Path(model)
    if path.exists():
        family = _family_of_files(path)
        if family is not None:
            return family
        what = "folder" if path.is_dir() else "file"
        raise ValueError(
            f"{path}: no installed family recognises the DiT in this {what} "
            f"(installed: {', '.join(f.id for f in list_families()) or 'none'}); pass a preset, a model folder laid "
            "out like an official release, or the DiT's checkpoint"
        )
    presets = ", ".join(name for family in list_families() for name in family.presets)
    raise ValueError(
        f"{str(model)!r} is not a preset, a released model id or an existing path; presets: {presets or 'none'}"
    )


def pipeline_for(model: str | os.PathLike | None) -> tuple[str, str]:
    """``(pipeline class name, kind)`` for a preset name, a model id, a local folder or file (see ``family_for``)."""
    family = family_for(model)
    return family.pipeline.rpartition(":")[2], family.kind


def preset_defaults(model: str | os.PathLike | None) -> dict[str, object]:
    """The call options a preset is usually run with (its ``sampling``), as keyword arguments of its pipeline's
    ``__call__``; empty for anything that is not a preset name or id."""
    found = resolve_preset(DEFAULT_MODEL if model is None else model)
    if found is None:
        return {}
    return {name: value for name, value in found[1].sampling.items() if value is not None}


def download_model(name: str, download_source: str | None = None) -> dict[str, list[Path]]:
    """Fetch every component of a preset through ds-loader (files already present are kept); local paths."""
    found = resolve_preset(name)
    if found is None:
        presets = ", ".join(p for family in list_families() for p in family.presets)
        raise ValueError(f"unknown model {name!r}; known presets: {presets}")
    result = {}
    for component, config in found[1].model_configs(download_source).items():
        logger.info("%s: %s", component, config)
        result[component] = config.resolve()
    return result
