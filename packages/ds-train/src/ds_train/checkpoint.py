"""Run checkpoints: a folder per step, written under a temporary name and renamed when complete.

A checkpoint holds the trainable weights (``trainable.safetensors``), the optimizer state (``optimizer.pt``,
tensors and plain values only, read back with ``torch.load(weights_only=True)``), the learning-rate scheduler
state and the step (``state.json``), and each process's random states (``rng-<rank>.safetensors`` for torch
generators, json for Python's and NumPy's). Nothing is unpickled beyond tensors and plain containers.
A crash while writing leaves a ``.tmp-`` folder that is ignored (and removed by the next run in the folder,
``remove_staging_leftovers``); the previous checkpoints stay intact. Every file is written through ds-loader's
atomic writer (synced to disk, mode from the umask).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ds_pipelines import atomic_file, save_safetensors_atomic, write_bytes_atomic
from ds_pipelines.media import metadata_json

__all__ = [
    "atomic_write_bytes",
    "checkpoint_steps",
    "finish_checkpoint",
    "latest_checkpoint",
    "load_rng",
    "read_checkpoint",
    "read_rng",
    "remove_staging_leftovers",
    "rng_state",
    "save_file_atomic",
    "staging_folder",
    "write_rng",
]

_NAME = re.compile(r"step-(\d+)")


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.save_file`` through a synced temporary in the same folder, then renamed into place."""
    return save_safetensors_atomic(tensors, path, metadata)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return write_bytes_atomic(path, data)


def checkpoint_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in ``folder`` (those with ``state.json``), ascending."""
    if not folder.is_dir():
        return []
    steps = []
    for entry in folder.iterdir():
        match = _NAME.fullmatch(entry.name)
        if match and (entry / "state.json").is_file():
            steps.append(int(match[1]))
    return sorted(steps)


def latest_checkpoint(folder: Path) -> Path | None:
    steps = checkpoint_steps(folder)
    return folder / f"step-{steps[-1]:06d}" if steps else None


def rng_state(generators: Mapping[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's random states: torch tensors (CPU, CUDA, named generators) and json-able Python/NumPy."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    for name, generator in generators.items():
        tensors[f"generator.{name}"] = generator.get_state()
    plain: dict[str, Any] = {"python": _jsonable(random.getstate())}
    try:
        import numpy

        kind, keys, position, has_gauss, cached = numpy.random.get_state()
        plain["numpy"] = [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, plain


def load_rng(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any], generators: Mapping[str, torch.Generator]):
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[key] for key in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    for name, generator in generators.items():
        key = f"generator.{name}"
        if key in tensors:
            generator.set_state(tensors[key])
    if "python" in plain:
        version, state, gauss = plain["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in plain:
        import numpy

        kind, keys, position, has_gauss, cached = plain["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, cached))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    return value


def staging_folder(folder: Path, step: int) -> Path:
    """The temporary folder checkpoint ``step`` is assembled in (every process writes its random state there)."""
    return folder / f".tmp-step-{step:06d}"


def finish_checkpoint(
    folder: Path,
    step: int,
    trainable: Mapping[str, torch.Tensor],
    optimizer_state: dict,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Main process: add weights, optimizer and state to the staging folder, rename it into place, prune."""
    temporary, final = staging_folder(folder, step), folder / f"step-{step:06d}"
    temporary.mkdir(parents=True, exist_ok=True)
    try:
        save_safetensors_atomic(trainable, temporary / "trainable.safetensors")
        with atomic_file(temporary / "optimizer.pt") as pending:
            torch.save(optimizer_state, pending.temporary)
        # Strict JSON (a diverged loss is "nan", not a bare NaN); written last: it marks the checkpoint complete.
        write_bytes_atomic(temporary / "state.json", metadata_json(state).encode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    steps = checkpoint_steps(folder)
    for old in steps[: max(0, len(steps) - keep)] if keep > 0 else []:
        shutil.rmtree(folder / f"step-{old:06d}", ignore_errors=True)
    return final


def remove_staging_leftovers(folder: Path) -> list[Path]:
    """Remove the staging folders (``.tmp-step-*``) of checkpoints a killed run never finished.

    Only for a run that holds the output folder's lock: then no other process is writing one of them.
    """
    removed = []
    for entry in sorted(folder.glob(".tmp-step-*")) if folder.is_dir() else []:
        if entry.is_dir() and re.fullmatch(r"\.tmp-step-\d+", entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def write_rng(folder: Path, rank: int, tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> None:
    """Each process's random state, next to the checkpoint (written before the checkpoint is renamed in)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file_atomic(dict(tensors), folder / f"rng-{rank}.safetensors")
    atomic_write_bytes(folder / f"rng-{rank}.json", json.dumps(plain).encode())


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    trainable = load_file(str(path / "trainable.safetensors"))
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    return trainable, optimizer_state, state


def read_rng(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    tensors_path, plain_path = path / f"rng-{rank}.safetensors", path / f"rng-{rank}.json"
    if not tensors_path.is_file():
        return None
    return load_file(str(tensors_path)), json.loads(plain_path.read_text())
