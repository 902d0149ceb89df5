"""ds-loader: from a model name or a file to a ready model.

Resolve files (``ModelConfig``), open checkpoints lazily (``open_checkpoints``), recognise them (``detect``,
through the ``ModelSpec``s family packages register under the ``ds.models`` entry points), convert them lazily
(``Recipe``) and load them (``load_model``), or describe them (``inspect_checkpoint``).
"""

from ds_loader.checkpoint import Checkpoint, HeaderView, open_checkpoints
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
    "HeaderView",
    "HubClient",
    "HuggingFaceHub",
    "LoaderError",
    "Match",
    "Mismatch",
    "ModelConfig",
    "ModelScopeHub",
    "ModelSpec",
    "Recipe",
    "RecipeError",
    "ReportEntry",
    "SpecRegistry",
    "StateDictMismatchError",
    "UnsafePathError",
    "detect",
    "drop",
    "fuse",
    "inspect_checkpoint",
    "load_model",
    "open_checkpoints",
    "open_weights",
    "register_spec",
    "registry",
    "rename",
    "reshape",
    "rule",
    "split",
    "strip_prefix",
    "swap_halves",
    "unregister_spec",
]
