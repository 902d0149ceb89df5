"""``inspect_checkpoint``: what a file or folder holds, from its headers alone, as data and as a table."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ds_loader.checkpoint import Checkpoint, open_checkpoints
from ds_loader.detect import registry, run_spec
from ds_loader.spec import Detection, Mismatch, ModelSpec

__all__ = ["CheckpointReport", "ReportEntry", "inspect_checkpoint"]


@dataclass(frozen=True)
class ReportEntry:
    """One recognised model (or one unrecognised component) of a checkpoint.

    ``family``, ``model``, ``format`` and ``config`` are None when no spec matched; ``note`` then says why the
    closest spec did not. ``parameter_count`` counts the elements of every stored tensor (persistent buffers
    included); ``dtypes`` maps dtype names to element counts.
    """

    component: str | None
    files: tuple[str, ...]
    family: str | None
    model: str | None
    format: str | None
    config: Any
    parameter_count: int
    tensor_count: int
    nbytes: int
    dtypes: dict[str, int]
    note: str = ""


@dataclass(frozen=True)
class CheckpointReport:
    path: str
    entries: tuple[ReportEntry, ...]

    def __str__(self) -> str:
        header = ("component", "family", "model", "format", "params", "size", "dtypes", "config")
        rows = [header]
        for e in self.entries:
            rows.append(
                (
                    e.component or "-",
                    e.family or "?",
                    e.model or "?",
                    e.format or "?",
                    _count(e.parameter_count),
                    _size(e.nbytes),
                    ", ".join(f"{d} {n / max(e.parameter_count, 1):.0%}" for d, n in e.dtypes.items()),
                    _config(e.config) if e.family else e.note,
                )
            )
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
        lines = [f"{self.path}"]
        for index, row in enumerate(rows):
            lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
            if index == 0:
                lines.append("  ".join("-" * width for width in widths))
        return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _config(config: Any) -> str:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config))
    return repr(config)


def _entries(checkpoint: Checkpoint, specs: list[ModelSpec]) -> list[ReportEntry]:
    common = {
        "component": checkpoint.component,
        "files": tuple(str(p) for p in checkpoint.paths),
        "parameter_count": checkpoint.parameter_count(),
        "tensor_count": len(checkpoint),
        "nbytes": checkpoint.nbytes(),
        "dtypes": checkpoint.dtypes(),
    }
    entries, misses = [], []
    for spec in specs:
        result = run_spec(spec, checkpoint)
        if isinstance(result, Detection):
            entries.append(
                ReportEntry(family=spec.family, model=spec.model, format=result.format, config=result.config, **common)
            )
        else:
            misses.append((result, spec))
    if not entries:
        closest: tuple[Mismatch, ModelSpec] | None = max(misses, key=lambda m: m[0].closeness, default=None)
        note = f"closest: {closest[1].name}: {closest[0].reason}" if closest else "no model specs registered"
        entries.append(ReportEntry(family=None, model=None, format=None, config=None, note=note, **common))
    return entries


def inspect_checkpoint(path: str | os.PathLike, specs: Iterable[ModelSpec] | None = None) -> CheckpointReport:
    """Family, model, format, inferred config, parameter count and dtypes of every model in ``path``.

    Reads headers only. Unrecognised components are reported (with the closest spec's reason), not raised, so
    the report works on any checkpoint; unreadable files still raise, naming the file.
    """
    candidates = list(specs) if specs is not None else registry.specs()
    entries = [entry for checkpoint in open_checkpoints(path) for entry in _entries(checkpoint, candidates)]
    return CheckpointReport(str(path), tuple(entries))
