"""ds-train: LoRA and full fine-tuning of diffusion models on accelerate, from one GPU to many.

``train(TrainingConfig(...))`` runs a whole fine-tuning job; the parts it is made of (datasets, the family
training adapter, peft LoRA injection, checkpointing, caching, logs) are importable on their own. Each family's
adapter lives in its own module (``ds_train.flux``, ``ds_train.wan``) and is found through the family registry.
"""

from ds_pipelines.lora_io import convert_lora_file, merge_lora_files, read_lora_layers, save_lora_file

from .cache import build_cache, encode_sample, load_cached, stack_conditions
from .config import TrainingConfig, TrainingResult
from .data import EXTRA_IMAGE_ROLES, BrokenRow, DatasetError, ExtraImages, ImageDataset, bucket_size
from .family import (
    FamilyOption,
    TrainingAdapter,
    adapter_for,
    declared_family_options,
    family_of_model,
    get_adapter,
    parse_option_value,
)
from .loop import train
from .lora import add_lora, load_lora_state, lora_state, resolve_targets
from .memory import MemoryEstimate, estimate_training_memory
from .parts import BatchPlan, enable_gradient_checkpointing, make_lr_scheduler, make_optimizer

__all__ = [
    "EXTRA_IMAGE_ROLES",
    "BatchPlan",
    "BrokenRow",
    "DatasetError",
    "ExtraImages",
    "FamilyOption",
    "ImageDataset",
    "MemoryEstimate",
    "TrainingAdapter",
    "TrainingConfig",
    "TrainingResult",
    "adapter_for",
    "add_lora",
    "bucket_size",
    "build_cache",
    "convert_lora_file",
    "declared_family_options",
    "enable_gradient_checkpointing",
    "encode_sample",
    "estimate_training_memory",
    "family_of_model",
    "get_adapter",
    "load_cached",
    "load_lora_state",
    "lora_state",
    "make_lr_scheduler",
    "make_optimizer",
    "merge_lora_files",
    "parse_option_value",
    "read_lora_layers",
    "resolve_targets",
    "save_lora_file",
    "stack_conditions",
    "train",
]
