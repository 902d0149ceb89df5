"""Fetching model files from ModelScope or Hugging Face, behind a small client interface tests can replace.

The hub libraries are imported only when a download really happens, so local and offline use never loads them
(and never opens a connection).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

from ds_loader.errors import UnsafePathError

__all__ = [
    "HubClient",
    "HuggingFaceHub",
    "ModelScopeHub",
    "check_model_id",
    "check_pattern",
    "hub_for",
]

logger = logging.getLogger(__name__)

DOWNLOAD_SOURCES = ("modelscope", "huggingface")


@runtime_checkable
class HubClient(Protocol):
    """Downloads the files of ``model_id`` matching ``allow_patterns`` into ``local_dir``.

    ``ignore_patterns`` lists files already present, which must not be fetched again.
    """

    def download(
        self, model_id: str, local_dir: Path, allow_patterns: list[str], ignore_patterns: list[str]
    ) -> None: ...


class ModelScopeHub:
    """``modelscope.snapshot_download``; the endpoint comes from ``MODELSCOPE_DOMAIN`` (e.g. ``modelscope.ai``)."""

    def __init__(self, endpoint: str | None = None, snapshot_download: Callable[..., Any] | None = None):
        self.endpoint = endpoint
        self._snapshot_download = snapshot_download

    @classmethod
    def from_env(cls) -> ModelScopeHub:
        domain = os.environ.get("MODELSCOPE_DOMAIN", "").strip()
        if domain and not domain.startswith(("http://", "https://")):
            domain = "https://" + domain
        return cls(endpoint=domain or None)

    def download(self, model_id: str, local_dir: Path, allow_patterns: list[str], ignore_patterns: list[str]) -> None:
        snapshot_download = self._snapshot_download
        if snapshot_download is None:
            from modelscope import snapshot_download
        kwargs: dict[str, Any] = {}
        if self.endpoint:
            kwargs["endpoint"] = self.endpoint
        snapshot_download(
            model_id,
            local_dir=str(local_dir),
            allow_file_pattern=allow_patterns,
            ignore_file_pattern=ignore_patterns or None,
            **kwargs,
        )


class HuggingFaceHub:
    """``huggingface_hub.snapshot_download`` into a plain folder (``local_dir``), not the shared HF cache."""

    def __init__(self, snapshot_download: Callable[..., Any] | None = None):
        self._snapshot_download = snapshot_download

    def download(self, model_id: str, local_dir: Path, allow_patterns: list[str], ignore_patterns: list[str]) -> None:
        snapshot_download = self._snapshot_download
        if snapshot_download is None:
            from huggingface_hub import snapshot_download
        snapshot_download(
            model_id,
            local_dir=str(local_dir),
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns or None,
        )


def hub_for(source: str) -> HubClient:
    """The default client for ``"modelscope"`` or ``"huggingface"``."""
    if source == "modelscope":
        return ModelScopeHub.from_env()
    if source == "huggingface":
        return HuggingFaceHub()
    raise ValueError(f"download_source={source!r} is not supported; use one of: {', '.join(DOWNLOAD_SOURCES)}")


def _is_absolute(text: str) -> bool:
    # A Windows drive ("C:") or a UNC/backslash root escapes the model folder just as "/" does.
    return text.startswith(("/", "\\")) or (len(text) > 1 and text[1] == ":") or Path(text).is_absolute()


def check_model_id(model_id: str) -> str:
    """Refuse ids that would place files outside the model base directory (``..``, absolute paths)."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise UnsafePathError(f"model_id={model_id!r} must be a non-empty string such as 'org/name'")
    parts = model_id.replace("\\", "/").split("/")
    if _is_absolute(model_id) or any(part in ("", ".", "..") for part in parts):
        raise UnsafePathError(
            f"model_id={model_id!r} is refused: it must be a relative 'org/name' id without '.', '..' or empty parts"
        )
    return model_id


def check_pattern(pattern: str, argument: str = "origin_file_pattern") -> str:
    """Refuse file patterns that escape the model directory; a pattern is relative, POSIX, without ``..``."""
    if _is_absolute(pattern) or ".." in PurePosixPath(pattern.replace("\\", "/")).parts:
        raise UnsafePathError(f"{argument}={pattern!r} is refused: it must stay inside the model directory")
    return pattern


def patterns_present(model_dir: Path, patterns: Sequence[str]) -> tuple[bool, list[str]]:
    """Whether every pattern already matches a local file, and the relative names of the files present."""
    present: set[str] = set()
    all_found = True
    for pattern in patterns:
        found = [p for p in model_dir.glob(pattern) if p.is_file()] if model_dir.is_dir() else []
        all_found = all_found and bool(found)
        present.update(p.relative_to(model_dir).as_posix() for p in found)
    return all_found, sorted(present)
