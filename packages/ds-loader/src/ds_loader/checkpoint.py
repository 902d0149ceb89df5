"""Checkpoints opened lazily: headers at open, tensor bytes only when a key is read.

Safetensors files (single, sharded with an index) are read through ``ds_vram.sources.SafetensorsSource`` (mmap,
zero copy). Pickle formats (``.pth .bin .pt .ckpt``) are read only through ``load_pickle``
(``torch.load(weights_only=True)``, which refuses code payloads), memory-mapped where the file allows. Every
source checks a floating-point tensor for NaN and infinity the first time it is read. A diffusers-layout folder
opens as one checkpoint per component folder (``transformer/``, ``vae/``, ``text_encoder/``...).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ds_loader.errors import CheckpointError
from ds_vram.sources import SafetensorsSource, TensorInfo, WeightSource, all_finite

__all__ = ["Checkpoint", "HeaderView", "PickleSource", "load_pickle", "open_checkpoints"]

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".pth", ".bin", ".pt", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# diffusers and transformers name precision variants "<name>.<variant>.safetensors".
VARIANTS = ("fp16", "bf16", "fp32", "fp8", "fp8_e4m3fn", "ema", "non_ema")
# Wrappers training frameworks put around a state dict.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "module", "model")


# What torch's weights-only unpickler names as the thing it refused ("Unsupported global: GLOBAL os.system ...").
_REFUSED = re.compile(
    r"WeightsUnpickler error: (?:Unsupported global: GLOBAL )?(?P<what>[^\n]*?)(?: was not| Please|\.?\n|$)"
)


def load_pickle(path: str | os.PathLike, *, what: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file and say what to do.

    The only way this project reads a pickle (``.pt .pth .bin .ckpt``): the weights-only unpickler builds
    tensors and plain containers and refuses everything else, so no code in the file runs. A refused file raises
    ``CheckpointError`` that names it, says which object it holds and how to get a safetensors file instead;
    an unreadable one raises ``CheckpointError`` naming it. ``what`` names the file's role in messages
    (``"checkpoint"``, ``"LoRA file"``). ``mmap`` maps zip-format files instead of reading them (files from
    ``torch.save(_use_new_zipfile_serialization=False)`` cannot be mapped and are read).
    """
    path = Path(path)
    try:
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _REFUSED.search(str(error))
        # The name comes from the file: escape control characters, so it cannot drive the user's terminal.
        name = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in (found["what"] if found else ""))[:80]
        holds = f"`{name.strip()}`" if name.strip() else "a Python object"
        raise CheckpointError(
            f"{path}: refused to load this {what}: it holds {holds}, not only tensors, and unpickling that could "
            f"run code (torch.load with weights_only=True refuses it). Get a .safetensors version of it from its "
            f"publisher, or convert it where it was made: safetensors.torch.save_file(state_dict, "
            f"'{path.stem}.safetensors') on the trainer's own state dict"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch {what} ({error})") from error


class PickleSource:
    """Tensors of a ``.pth/.bin/.pt/.ckpt`` file, loaded with ``weights_only=True`` (mmap where possible).

    A pickle has no separate header, so opening parses the file; with a zip-format file the tensor bytes stay
    mapped, not read. Non-tensor entries (step counters, hyper-parameters) are ignored.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {self.path}")
        if self.path.stat().st_size == 0:
            raise CheckpointError(f"{self.path}: the file is empty")
        self._tensors = _unwrap(self.path, load_pickle(self.path, mmap=True))
        self._checked: set[str] = set()

    def keys(self) -> Iterator[str]:
        return iter(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def info(self, key: str) -> TensorInfo:
        tensor = self._tensor(key)
        return TensorInfo(tensor.dtype, tuple(tensor.shape))

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in {self.path}") from None

    def get(self, key: str) -> torch.Tensor:
        """The tensor, checked for NaN and infinity on its first read (the error names the file and the key)."""
        tensor = self._tensor(key)
        if key not in self._checked:  # once per key, as SafetensorsSource does: streaming reads a key many times
            if not all_finite(tensor):
                raise CheckpointError(f"{self.path}: tensor {key!r} holds NaN or infinite values; the file is broken")
            self._checked.add(key)
        return tensor


def _unwrap(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (top-level keys: {list(obj)[:8]})")
    return tensors


class _MergedSource:
    """Several sources seen as one; a key in two of them is an error, as in shards it would be ambiguous."""

    def __init__(self, sources: Sequence[WeightSource], paths: Sequence[Path]):
        self._owner: dict[str, WeightSource] = {}
        where: dict[str, Path] = {}
        for source, path in zip(sources, paths, strict=True):
            for key in source.keys():  # noqa: SIM118 - a WeightSource need not be iterable
                if key in self._owner:
                    raise CheckpointError(f"tensor {key!r} appears in both {where[key]} and {path}")
                self._owner[key], where[key] = source, path

    def keys(self) -> Iterator[str]:
        return iter(self._owner)

    def __contains__(self, key: object) -> bool:
        return key in self._owner

    def info(self, key: str) -> TensorInfo:
        return self._owner[key].info(key)

    def get(self, key: str) -> torch.Tensor:
        return self._owner[key].get(key)


class Checkpoint:
    """One model's tensors, from one or more files; a ``WeightSource`` (keys, info, get), read lazily.

    ``component`` is the diffusers folder name (``transformer``, ``vae``...) when the checkpoint came from one,
    and ``config_json`` that folder's ``config.json`` (or None).
    """

    def __init__(self, source: WeightSource, paths: Sequence[Path], component: str | None = None):
        self.source = source
        self.paths = list(paths)
        self.component = component
        self._keys = list(source.keys())
        self._config_json: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        """Something a person recognises in a message: the file, or the folder for several files."""
        if len(self.paths) == 1:
            return str(self.paths[0])
        return f"{self.paths[0].parent} ({len(self.paths)} files)"

    @property
    def config_json(self) -> dict[str, Any] | None:
        if self._config_json is None:
            config = self.paths[0].parent / "config.json"
            if config.is_file():
                try:
                    self._config_json = json.loads(config.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    raise CheckpointError(f"{config}: not valid JSON ({error})") from None
        return self._config_json

    def keys(self) -> Iterator[str]:
        return iter(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self.source

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        component = f", component={self.component!r}" if self.component else ""
        return f"Checkpoint({self.name!r}, {len(self)} tensors{component})"

    def info(self, key: str) -> TensorInfo:
        return self.source.info(key)

    def get(self, key: str) -> torch.Tensor:
        return self.source.get(key)

    def parameter_count(self) -> int:
        return sum(self.info(k).numel for k in self._keys)

    def nbytes(self) -> int:
        return sum(self.info(k).nbytes for k in self._keys)

    def dtypes(self) -> dict[str, int]:
        """Number of elements per dtype, e.g. ``{"bfloat16": 11_900_000_000}``."""
        counts: Counter[str] = Counter()
        for key in self._keys:
            info = self.info(key)
            counts[str(info.dtype).removeprefix("torch.")] += info.numel
        return dict(counts.most_common())

    def view(self) -> HeaderView:
        return HeaderView(self)


class HeaderView:
    """What detection may see of a checkpoint: key names, shapes and dtypes, never tensor data."""

    def __init__(self, checkpoint: Checkpoint):
        self._checkpoint = checkpoint

    @property
    def name(self) -> str:
        return self._checkpoint.name

    @property
    def component(self) -> str | None:
        return self._checkpoint.component

    @property
    def config_json(self) -> dict[str, Any] | None:
        return self._checkpoint.config_json

    def keys(self) -> Iterator[str]:
        return self._checkpoint.keys()

    def __iter__(self) -> Iterator[str]:
        return self._checkpoint.keys()

    def __contains__(self, key: object) -> bool:
        return key in self._checkpoint

    def __len__(self) -> int:
        return len(self._checkpoint)

    def info(self, key: str) -> TensorInfo:
        return self._checkpoint.info(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._checkpoint.info(key).shape

    def count_blocks(self, prefix: str) -> int:
        """How many numbered blocks follow ``prefix`` (``"blocks."`` counts ``blocks.0...``, ``blocks.1...``)."""
        indices = set()
        for key in self._checkpoint:
            if key.startswith(prefix):
                head = key[len(prefix) :].split(".", 1)[0]
                if head.isdigit():
                    indices.add(int(head))
        return max(indices) + 1 if indices else 0


def open_checkpoints(target: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Checkpoint]:
    """Open files or folders as checkpoints without reading tensor data.

    A list of files is one model split over several files (other files in it, such as ``config.json``, are
    skipped). A ``*.index.json`` names the shards. A folder
    holding weight files is one model (a diffusers component folder); a folder holding only component
    subfolders (a diffusers repository) gives one checkpoint per component that has weights.
    """
    if isinstance(target, (str, os.PathLike)):
        target = [target]
    paths = [Path(p) for p in target]
    if not paths:
        raise ValueError("open_checkpoints needs at least one path")
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
    if len(paths) == 1 and paths[0].is_dir():
        return _open_folder(paths[0])
    folders = [str(p) for p in paths if p.is_dir()]
    if folders:
        raise CheckpointError(f"a list of checkpoint paths must name files, not folders: {', '.join(folders)}")
    if len(paths) > 1:
        # A glob such as "text_encoder/*" also matches config.json, the shard index and tokenizer files.
        weights = [p for p in paths if p.name.endswith(WEIGHT_SUFFIXES)]
        indexes = [p for p in paths if p.name.endswith(".index.json")]
        if not weights and len(indexes) == 1:
            weights = indexes
        if not weights:
            raise CheckpointError(
                f"none of {', '.join(map(str, paths))} is a weight file ({', '.join(WEIGHT_SUFFIXES)})"
            )
        skipped = [p.name for p in paths if p not in weights]
        if skipped:
            logger.debug("not weights, skipped: %s", skipped)
        paths = weights
    return [_open_files(paths)]


def _open_files(paths: list[Path], component: str | None = None) -> Checkpoint:
    if len(paths) == 1 and paths[0].name.endswith(".index.json"):
        paths = _shards_of(paths[0])
    for path in paths:
        if not path.name.endswith(WEIGHT_SUFFIXES):
            raise CheckpointError(
                f"{path}: unsupported checkpoint format; expected one of {', '.join(WEIGHT_SUFFIXES)} or *.index.json"
            )
    safetensors = [p for p in paths if p.suffix == ".safetensors"]
    if len(safetensors) == len(paths):
        return Checkpoint(SafetensorsSource(paths), paths, component)
    sources: list[WeightSource] = [
        SafetensorsSource(p) if p.suffix == ".safetensors" else PickleSource(p) for p in paths
    ]
    source = sources[0] if len(sources) == 1 else _MergedSource(sources, paths)
    return Checkpoint(source, paths, component)


def _shards_of(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{index}: not valid JSON ({error})") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index}: has no 'weight_map' object") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or ".." in PurePosixPath(name).parts or Path(name).is_absolute():
            raise CheckpointError(f"{index}: shard name {name!r} must be a file next to the index")
        shard = index.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index}: shard {name} is missing from {index.parent}")
        shards.append(shard)
    return shards


def _variant(path: Path) -> str | None:
    parts = path.name.split(".")
    return parts[-2] if len(parts) >= 3 and parts[-2] in VARIANTS else None


def _weights_in(folder: Path) -> list[Path]:
    """The weight files of one model in a folder, preferring an index, safetensors, and no precision variant."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    groups = [
        [p for p in files if p.name.endswith(".safetensors.index.json")],
        [p for p in files if p.suffix == ".safetensors"],
        [p for p in files if p.name.endswith(".index.json") and not p.name.endswith(".safetensors.index.json")],
        [p for p in files if p.suffix in PICKLE_SUFFIXES],
    ]
    for group in groups:
        if not group:
            continue
        plain = [p for p in group if _variant(p) is None]
        chosen = plain or group
        if chosen[0].name.endswith(".index.json"):
            if len(chosen) > 1:
                names = ", ".join(p.name for p in chosen)
                raise CheckpointError(f"{folder}: several shard indexes ({names}); pass the one to load")
            return chosen
        variants = {_variant(p) for p in chosen}
        if len(variants) > 1:
            raise CheckpointError(f"{folder}: weights in variants {sorted(map(str, variants))}; pass the files")
        return chosen
    return []


def _open_folder(folder: Path) -> list[Checkpoint]:
    own = _weights_in(folder)
    if own and not (folder / "model_index.json").is_file():
        return [_open_files(own, component=None)]
    checkpoints = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        weights = _weights_in(sub)
        if weights:
            checkpoints.append(_open_files(weights, component=sub.name))
    if not checkpoints:
        raise CheckpointError(
            f"{folder}: no weights found (looked for {', '.join(WEIGHT_SUFFIXES)} here and in component folders)"
        )
    return checkpoints
