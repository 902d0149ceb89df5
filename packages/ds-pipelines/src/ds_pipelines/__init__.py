"""ds-pipelines: from prompt to pixels, and the sampling math that training shares."""

# Pipelines take ``vram=VRAMConfig(...)``, report what ds-vram manages and load what ds-loader inspects: packages
# above ds-pipelines (ds-train, the apps) use ds-vram and ds-loader through these names, as DESIGN.md's import
# rules ask.
from ds_loader import inspect_checkpoint
from ds_loader.families import (
    FamilyDescriptor,
    Preset,
    get_family,
    list_families,
    register_family,
    unregister_family,
)
from ds_loader.families import find_preset as find_family_preset
from ds_loader.files import (
    FolderLock,
    FolderLockedError,
    atomic_file,
    remove_leftovers,
    save_safetensors_atomic,
    write_bytes_atomic,
)
from ds_vram import VRAMConfig, get_vram_handle

from .base import Pipeline, PipelineStepError, pipeline_step
from .catalog import (
    MEMORY_SETTINGS,
    ComponentSize,
    MemoryNeed,
    ModelEntry,
    VRAMSuggestion,
    download_model,
    estimate_memory,
    family_for,
    get_model_entry,
    list_models,
    memory_need,
    pipeline_for,
    preset_defaults,
    suggest_vram,
)
from .controlnet import ControlNetInput
from .flux_image import FluxImagePipeline
from .lora import LoraPiece, lora_layers, parse_lora, read_lora
from .lora_info import LoraInfo, inspect_lora, lora_key_format
from .media import VideoFrames, image_to_tensor, load_video, save_image, save_video, tensor_to_images
from .schedulers import FLOW_MATCH_TEMPLATES, FlowMatchScheduler, FlowMatchTemplate, FlowUniPCScheduler, shift_sigmas
from .wan_video import WanVideoPipeline

__all__ = [
    "FLOW_MATCH_TEMPLATES",
    "MEMORY_SETTINGS",
    "ComponentSize",
    "ControlNetInput",
    "FamilyDescriptor",
    "FlowMatchScheduler",
    "FlowMatchTemplate",
    "FlowUniPCScheduler",
    "FluxImagePipeline",
    "FolderLock",
    "FolderLockedError",
    "LoraInfo",
    "LoraPiece",
    "MemoryNeed",
    "ModelEntry",
    "Pipeline",
    "PipelineStepError",
    "Preset",
    "VRAMConfig",
    "VRAMSuggestion",
    "VideoFrames",
    "WanVideoPipeline",
    "atomic_file",
    "download_model",
    "estimate_memory",
    "family_for",
    "find_family_preset",
    "get_family",
    "get_model_entry",
    "get_vram_handle",
    "image_to_tensor",
    "inspect_checkpoint",
    "inspect_lora",
    "list_families",
    "list_models",
    "load_video",
    "lora_key_format",
    "lora_layers",
    "memory_need",
    "parse_lora",
    "pipeline_for",
    "pipeline_step",
    "preset_defaults",
    "read_lora",
    "register_family",
    "remove_leftovers",
    "save_image",
    "save_safetensors_atomic",
    "save_video",
    "shift_sigmas",
    "suggest_vram",
    "tensor_to_images",
    "unregister_family",
    "write_bytes_atomic",
]


def __getattr__(name: str) -> type:
    """A registered family's pipeline class by name (``ds_pipelines.<Family>Pipeline``): a family added later is
    reachable here through its descriptor's import string, with no line in this file."""
    for family in list_families():
        if family.pipeline.rpartition(":")[2] == name:
            return family.pipeline_class()
    raise AttributeError(f"module 'ds_pipelines' has no attribute {name!r}")
