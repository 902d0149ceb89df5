"""Run checkpoints: a folder per step, written under a temporary name and renamed when complete.

A checkpoint holds the trainable weights (``trainable.safetensors``), the optimizer state (``optimizer.pt``,
tensors and plain values only, read back with ``torch.load(weights_only=True)``), the learning-rate scheduler
state and the step (``state.json``), and each process's random states (``rng-<rank>.safetensors`` for torch
generators, json for Python's and NumPy's). Nothing is unpickled beyond tensors and plain containers.
A crash while writing leaves a ``.tmp-`` folder that is ignored; the previous checkpoints stay intact.
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
from safetensors.torch import load_file, save_file

__all__ = [
    "atomic_write_bytes",
    "checkpoint_steps",
    "finish_checkpoint",
    "latest_checkpoint",
    "load_rng",
    "read_checkpoint",
    "read_rng",
    "rng_state",
    "save_file_atomic",
    "staging_folder",
    "write_rng",
]

_NAME = re.compile(r"step-(\d+)")


def save_file_atomic(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.save_file`` to a temporary name in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


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
        tensors = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
        save_file(tensors, str(temporary / "trainable.safetensors"))
        torch.save(optimizer_state, temporary / "optimizer.pt")
        (temporary / "state.json").write_text(json.dumps(state, indent=1))  # last: marks it complete
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
