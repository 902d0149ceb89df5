"""The model catalog: one import for its three jobs, each in its own module.

- ``sizing``: the released models of every registered family and their sizes (``list_models``, ``ModelEntry``).
- ``memory_rule``: how much GPU memory a generation needs per VRAM setting (``memory_need``, ``suggest_vram``).
- ``routing``: which family and pipeline a name or path stands for, preset call defaults, downloads.
"""

from __future__ import annotations

from .memory_rule import (
    MEASURED_MEMORY_ENV,
    MEASURED_MEMORY_FILE,
    MEMORY_SETTINGS,
    MemoryNeed,
    VRAMSuggestion,
    activation_bytes,
    estimate_memory,
    measured_memory_file,
    memory_need,
    rule_estimate,
    suggest_vram,
)
from .routing import DEFAULT_MODEL, download_model, family_for, pipeline_for, preset_defaults, resolve_preset
from .sizing import ComponentSize, ModelEntry, clear_model_cache, get_model_entry, list_models

__all__ = [
    "DEFAULT_MODEL",
    "MEASURED_MEMORY_ENV",
    "MEASURED_MEMORY_FILE",
    "MEMORY_SETTINGS",
    "ComponentSize",
    "MemoryNeed",
    "ModelEntry",
    "VRAMSuggestion",
    "activation_bytes",
    "clear_model_cache",
    "download_model",
    "estimate_memory",
    "family_for",
    "get_model_entry",
    "list_models",
    "measured_memory_file",
    "memory_need",
    "pipeline_for",
    "preset_defaults",
    "resolve_preset",
    "rule_estimate",
    "suggest_vram",
]
