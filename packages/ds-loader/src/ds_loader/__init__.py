"""ds-loader: from a model name or a file to a ready model.

Resolve files (``ModelConfig``), open checkpoints lazily (``open_checkpoints``), recognise them (``detect``,
through the ``ModelSpec``s family packages register under the ``ds.models`` entry points), convert them lazily
(``Recipe``) and load them (``load_model``), or describe them (``inspect_checkpoint``).
"""

from ds_loader.checkpoint import Checkpoint, HeaderView, load_pickle, open_checkpoints
from ds_loader.config import ModelConfig
from ds_loader.detect import ENTRY_POINT_GROUP, Match, SpecRegistry, detect, register_spec, registry, unregister_spec
from ds_loader.download import HubClient, HuggingFaceHub, ModelScopeHub
from ds_loader.errors import (
    AmbiguousModelError,
    CheckpointError,
    DetectionError,
    LoaderError,
    RecipeError,
    StateDictMismatchError,
    UnsafePathError,
)
from ds_loader.families import (
    FamilyDescriptor,
    LoraNaming,
    LoraTarget,
    Preset,
    PresetFile,
    TokenLayout,
    find_preset,
    get_family,
    list_families,
    register_family,
    unregister_family,
)
from ds_loader.files import (
    FolderLock,
    FolderLockedError,
    PendingFile,
    atomic_file,
    numbered_path,
    remove_leftovers,
    save_safetensors_atomic,
    write_bytes_atomic,
)
from ds_loader.inspect import CheckpointReport, ReportEntry, inspect_checkpoint
from ds_loader.load import load_model, open_weights
from ds_loader.recipes import (
    ConvertedSource,
    Recipe,
    drop,
    fuse,
    rename,
    reshape,
    rule,
    split,
    strip_prefix,
    swap_halves,
)
from ds_loader.spec import Detection, Mismatch, ModelSpec

__all__ = [
    "ENTRY_POINT_GROUP",
    "AmbiguousModelError",
    "Checkpoint",
    "CheckpointError",
    "CheckpointReport",
    "ConvertedSource",
    "Detection",
    "DetectionError",
    "FamilyDescriptor",
    "FolderLock",
    "FolderLockedError",
    "HeaderView",
    "HubClient",
    "HuggingFaceHub",
    "LoaderError",
    "LoraNaming",
    "LoraTarget",
    "Match",
    "Mismatch",
    "ModelConfig",
    "ModelScopeHub",
    "ModelSpec",
    "PendingFile",
    "Preset",
    "PresetFile",
    "Recipe",
    "RecipeError",
    "ReportEntry",
    "SpecRegistry",
    "StateDictMismatchError",
    "TokenLayout",
    "UnsafePathError",
    "atomic_file",
    "detect",
    "drop",
    "find_preset",
    "fuse",
    "get_family",
    "inspect_checkpoint",
    "list_families",
    "load_model",
    "load_pickle",
    "numbered_path",
    "open_checkpoints",
    "open_weights",
    "register_family",
    "register_spec",
    "registry",
    "remove_leftovers",
    "rename",
    "reshape",
    "rule",
    "save_safetensors_atomic",
    "split",
    "strip_prefix",
    "swap_halves",
    "unregister_family",
    "unregister_spec",
    "write_bytes_atomic",
]
