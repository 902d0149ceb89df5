"""``ModelSpec``: what a family package tells the loader about one model it can build.

A spec recognises its checkpoints from key names and shapes (``detect``), infers the config from them, and
names the format; each format maps to a lazy recipe into the model's own key names (None: no conversion).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ds_loader.checkpoint import HeaderView
from ds_loader.recipes import Recipe

__all__ = ["Detection", "Mismatch", "ModelSpec"]


@dataclass(frozen=True)
class Detection:
    """A spec recognised a checkpoint: in which format, and the config its shapes imply."""

    format: str
    config: Any


@dataclass(frozen=True)
class Mismatch:
    """A spec did not recognise a checkpoint: why, and how close it came (0: unrelated, 1: almost).

    ``closeness`` ranks specs in the "no match" error, so the user sees the likeliest candidates first.
    """

    reason: str
    closeness: float = 0.0


DetectFn = Callable[[HeaderView], Detection | Mismatch]


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: a spec is a registry entry, not a value
class ModelSpec:
    """One buildable model.

    name: unique, ``"<family>.<model>"`` (``"flux.1.dit"``).
    model_class: the ``nn.Module``; built as ``model_class(config)`` unless ``build`` is given.
    config_class: the config dataclass ``detect`` returns.
    detect: ``HeaderView -> Detection | Mismatch``; must read headers only.
    formats: format name -> ``Recipe`` into the model's key names, or None where the keys already match.
    never_fp8: glob patterns of layers ds-vram must not store in FP8 (sensitive, small).
    vram_units: glob patterns of submodules ds-vram manages as one unit.
    """

    name: str
    family: str
    model_class: type[nn.Module]
    config_class: type
    detect: DetectFn
    formats: Mapping[str, Recipe | None]
    never_fp8: tuple[str, ...] = ()
    vram_units: tuple[str, ...] = ()
    build: Callable[[Any], nn.Module] | None = None

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"ModelSpec name={self.name!r} must be a non-empty string such as 'flux.1.dit'")
        if not self.formats:
            raise ValueError(f"ModelSpec {self.name!r}: formats must name at least one format")
        for fmt, recipe in self.formats.items():
            if recipe is not None and not isinstance(recipe, Recipe):
                raise TypeError(f"ModelSpec {self.name!r}: format {fmt!r} maps to {recipe!r}, not a Recipe or None")
        if not callable(self.detect):
            raise TypeError(f"ModelSpec {self.name!r}: detect must be callable")

    @property
    def model(self) -> str:
        """The model part of the name (``"dit"`` for ``"flux.1.dit"``)."""
        return self.name.split(".", 1)[-1]

    def recipe(self, fmt: str) -> Recipe | None:
        try:
            return self.formats[fmt]
        except KeyError:
            raise ValueError(f"spec {self.name!r} has no format {fmt!r}; it knows {sorted(self.formats)}") from None

    def create(self, config: Any) -> nn.Module:
        """Construct the model (callers do this under ``torch.device("meta")``)."""
        if not isinstance(config, self.config_class):
            raise TypeError(f"spec {self.name!r} needs a {self.config_class.__name__}, got {type(config).__name__}")
        return self.build(config) if self.build is not None else self.model_class(config)
