"""Which model a checkpoint holds: every registered spec looks at the headers, and the matches are returned.

Specs come from the entry-point group ``ds.models`` (each entry point loads a ``ModelSpec``, an iterable of
them, or a callable returning either) and from ``register_spec`` for code and tests.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from ds_loader.checkpoint import Checkpoint, open_checkpoints
from ds_loader.errors import DetectionError
from ds_loader.spec import Detection, Mismatch, ModelSpec

__all__ = ["ENTRY_POINT_GROUP", "Match", "SpecRegistry", "detect", "register_spec", "registry", "unregister_spec"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ds.models"
CheckpointLike = str | os.PathLike | Checkpoint | Sequence[str | os.PathLike] | Sequence[Checkpoint]


class SpecRegistry:
    """Named specs: the installed family packages' (loaded once, on first use) plus registered ones."""

    def __init__(self, discover: Callable[[], Iterable[EntryPoint]] | None = None):
        self._discover = discover or (lambda: entry_points(group=ENTRY_POINT_GROUP))
        self._specs: dict[str, ModelSpec] = {}
        self._loaded = False

    def register(self, spec: ModelSpec, replace: bool = False) -> ModelSpec:
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"register_spec needs a ModelSpec, got {type(spec).__name__}")
        if spec.name in self._specs and not replace and self._specs[spec.name] is not spec:
            raise ValueError(f"a model spec named {spec.name!r} is already registered; pass replace=True")
        self._specs[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        self._specs.pop(name, None)

    def _load_entry_points(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for point in self._discover():
            try:
                specs = _as_specs(point.load(), point)
            except Exception as error:  # one broken family must not stop loading the others
                logger.warning("cannot load model specs from entry point %s (%s): %s", point.name, point.value, error)
                continue
            for spec in specs:
                if spec.name in self._specs and self._specs[spec.name] is not spec:
                    logger.warning(
                        "model spec %s from entry point %s is already registered; kept the first",
                        spec.name,
                        point.name,
                    )
                self._specs.setdefault(spec.name, spec)

    def specs(self) -> list[ModelSpec]:
        self._load_entry_points()
        return list(self._specs.values())

    def get(self, name: str) -> ModelSpec:
        self._load_entry_points()
        try:
            return self._specs[name]
        except KeyError:
            raise KeyError(f"no model spec named {name!r}; registered: {sorted(self._specs) or 'none'}") from None


def _as_specs(loaded: Any, point: EntryPoint) -> list[ModelSpec]:
    if callable(loaded) and not isinstance(loaded, ModelSpec):
        loaded = loaded()
    items = [loaded] if isinstance(loaded, ModelSpec) else list(loaded)
    bad = [item for item in items if not isinstance(item, ModelSpec)]
    if bad:
        raise TypeError(f"entry point {point.name} ({point.value}) gave {bad[0]!r}, not a ModelSpec")
    return items


registry = SpecRegistry()


def register_spec(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add a spec to the default registry (family packages use the ``ds.models`` entry points instead)."""
    return registry.register(spec, replace=replace)


def unregister_spec(name: str) -> None:
    registry.unregister(name)


@dataclass(frozen=True)
class Match:
    """A spec that recognised a checkpoint, with the format and the config it inferred."""

    spec: ModelSpec
    format: str
    config: Any
    checkpoint: Checkpoint

    def describe(self) -> str:
        component = f" in {self.checkpoint.component}/" if self.checkpoint.component else ""
        return f"{self.spec.name} (format {self.format!r}{component})"


def as_checkpoints(target: CheckpointLike) -> list[Checkpoint]:
    if isinstance(target, Checkpoint):
        return [target]
    if isinstance(target, Sequence) and not isinstance(target, str) and target and isinstance(target[0], Checkpoint):
        return list(target)
    return open_checkpoints(target)


def run_spec(spec: ModelSpec, checkpoint: Checkpoint) -> Detection | Mismatch:
    """One spec's verdict on one checkpoint; a crashing or inconsistent detect function becomes a Mismatch."""
    try:
        result = spec.detect(checkpoint.view())
    except Exception as error:  # a buggy detector of one family must not hide the others' matches
        logger.warning("detect of spec %s failed on %s: %r", spec.name, checkpoint.name, error)
        return Mismatch(f"its detect function raised {type(error).__name__}: {error}")
    if isinstance(result, Detection):
        if result.format not in spec.formats:
            return Mismatch(f"detect named format {result.format!r}, which the spec does not define")
        if not isinstance(result.config, spec.config_class):
            return Mismatch(f"detect returned a {type(result.config).__name__}, not a {spec.config_class.__name__}")
        return result
    if isinstance(result, Mismatch):
        return result
    return Mismatch(f"detect returned {result!r} instead of a Detection or Mismatch")


def detect(target: CheckpointLike, specs: Iterable[ModelSpec] | None = None) -> list[Match]:
    """Every (spec, component) pair that recognises the checkpoint, reading headers only.

    ``specs`` defaults to the registry. Raises ``DetectionError`` listing the closest specs and their reasons
    when nothing matches.
    """
    checkpoints = as_checkpoints(target)
    candidates = list(specs) if specs is not None else registry.specs()
    if not candidates:
        raise DetectionError(
            f"cannot identify {checkpoints[0].name}: no model specs are registered; install a family package "
            f"(ds-models-flux, ds-models-wan, ...) or pass spec="
        )
    matches: list[Match] = []
    misses: list[tuple[Mismatch, ModelSpec, Checkpoint]] = []
    for checkpoint in checkpoints:
        for spec in candidates:
            result = run_spec(spec, checkpoint)
            if isinstance(result, Detection):
                matches.append(Match(spec, result.format, result.config, checkpoint))
            else:
                misses.append((result, spec, checkpoint))
    if not matches:
        raise DetectionError(no_match_message(checkpoints, misses))
    return matches


def no_match_message(checkpoints: list[Checkpoint], misses: list[tuple[Mismatch, ModelSpec, Checkpoint]]) -> str:
    names = ", ".join(c.name for c in checkpoints)
    keys = [k for c in checkpoints for k in list(c.keys())[:3]]
    lines = [f"no model spec recognises {names} (first keys: {keys}); closest:"]
    ranked = sorted(misses, key=lambda item: -item[0].closeness)
    for mismatch, spec, checkpoint in ranked[:5]:
        where = f" [{checkpoint.component}]" if checkpoint.component else ""
        lines.append(f"  - {spec.name}{where} ({mismatch.closeness:.0%} close): {mismatch.reason}")
    if len(ranked) > 5:
        lines.append(f"  ... and {len(ranked) - 5} more")
    return "\n".join(lines)
