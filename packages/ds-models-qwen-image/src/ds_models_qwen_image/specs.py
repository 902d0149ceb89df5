"""Detection specs for Qwen-Image, registered under ``ds.models`` (filled in as the components land)."""

from __future__ import annotations

from ds_loader import ModelSpec

__all__ = ["SPECS"]

SPECS: tuple[ModelSpec, ...] = ()
