"""``ModelConfig``: where a model's files are, or where to fetch them from, resolved to local paths.

Environment variables are read when a config is resolved, not at import, so setting them late still works:
``DIFFSYNTH_DOWNLOAD_SOURCE`` (modelscope | huggingface), ``DIFFSYNTH_MODEL_BASE_PATH`` (default ``./models``;
an explicit ``local_model_path`` wins), ``DIFFSYNTH_SKIP_DOWNLOAD`` (used when ``skip_download`` is None) and
``MODELSCOPE_DOMAIN`` (the ModelScope site).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ds_loader.download import (
    DOWNLOAD_SOURCES,
    HubClient,
    check_model_id,
    check_pattern,
    hub_for,
    patterns_present,
)

__all__ = ["ModelConfig"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={os.environ[name]!r} must be one of {_TRUE + _FALSE[:-1]}")


@dataclass
class ModelConfig:
    """A model's files: either ``path`` (local files or folders) or ``model_id`` plus ``origin_file_pattern``.

    ``origin_file_pattern`` is a glob (or list of globs) relative to the model's folder; ``None``, ``""`` or
    ``"./"`` mean the whole repository, and a pattern ending in ``/`` names a folder (a diffusers component).
    Files land in ``<base>/<model_id>/`` where base is ``local_model_path``, else ``DIFFSYNTH_MODEL_BASE_PATH``,
    else ``./models``. Files already there are not fetched again.
    """

    model_id: str | None = None
    origin_file_pattern: str | list[str] | None = None
    path: PathLike | list[PathLike] | None = None
    download_source: str | None = None
    local_model_path: PathLike | None = None
    skip_download: bool | None = None

    def __post_init__(self) -> None:
        if self.path is None and self.model_id is None:
            raise ValueError("ModelConfig needs path= (local files) or model_id= (a ModelScope/Hugging Face id)")
        if self.model_id is not None:
            check_model_id(self.model_id)
        for pattern in self._patterns():
            check_pattern(pattern)
        if self.download_source is not None:
            self._check_source(self.download_source, "download_source")

    @staticmethod
    def _check_source(value: str, argument: str) -> str:
        source = value.strip().lower()
        if source not in DOWNLOAD_SOURCES:
            raise ValueError(f"{argument}={value!r} is not supported; use one of: {', '.join(DOWNLOAD_SOURCES)}")
        return source

    def _patterns(self) -> list[str]:
        patterns = self.origin_file_pattern
        if patterns is None:
            return []
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        return [p for p in patterns if p not in ("", "./")]

    @property
    def source(self) -> str:
        """The download source in effect: the field, else ``DIFFSYNTH_DOWNLOAD_SOURCE``, else modelscope."""
        if self.download_source is not None:
            return self._check_source(self.download_source, "download_source")
        env = os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE")
        return self._check_source(env, "DIFFSYNTH_DOWNLOAD_SOURCE") if env else "modelscope"

    @property
    def model_dir(self) -> Path:
        """Where this model's files live: ``<base>/<model_id>``."""
        if self.model_id is None:
            raise ValueError("model_dir needs model_id; this config names local files through path=")
        base = self.local_model_path or os.environ.get("DIFFSYNTH_MODEL_BASE_PATH") or "./models"
        return Path(base) / self.model_id

    @property
    def skips_download(self) -> bool:
        if self.skip_download is not None:
            return bool(self.skip_download)
        return _env_flag("DIFFSYNTH_SKIP_DOWNLOAD")

    def resolve(self, hub: HubClient | None = None) -> list[Path]:
        """Local files or folders for this model, downloading what is missing unless downloads are skipped.

        ``path=`` configs never touch the network; neither does a model whose every pattern already matches a
        local file. ``hub`` replaces the ModelScope/Hugging Face client (tests, mirrors).
        """
        if self.path is not None:
            return self._resolve_paths()
        check_model_id(self.model_id)  # again: fields may have changed since construction
        patterns = [check_pattern(p) for p in self._patterns()]
        model_dir = self.model_dir
        download_patterns = [p + "*" if p.endswith("/") else p for p in patterns] or ["*"]
        if not self.skips_download:
            all_present, present = patterns_present(model_dir, download_patterns) if patterns else (False, [])
            if not all_present:
                client = hub if hub is not None else hub_for(self.source)
                logger.info(
                    "downloading %s %s from %s to %s", self.model_id, download_patterns, self.source, model_dir
                )
                model_dir.mkdir(parents=True, exist_ok=True)
                client.download(self.model_id, model_dir, download_patterns, present)
        return self._glob(model_dir, patterns)

    def _resolve_paths(self) -> list[Path]:
        paths = [self.path] if isinstance(self.path, (str, os.PathLike)) else list(self.path)
        resolved = [Path(p) for p in paths]
        missing = [str(p) for p in resolved if not p.exists()]
        if missing:
            raise FileNotFoundError(f"ModelConfig path not found: {', '.join(missing)}")
        return resolved

    def _glob(self, model_dir: Path, patterns: list[str]) -> list[Path]:
        if not model_dir.is_dir():
            raise FileNotFoundError(
                f"model folder {model_dir} for {self.model_id!r} does not exist and downloads are skipped"
            )
        if not patterns:
            return [model_dir]
        found: set[Path] = set()
        for pattern in patterns:
            found.update(model_dir.glob(pattern.rstrip("/")) if pattern.endswith("/") else model_dir.glob(pattern))
        if not found:
            raise FileNotFoundError(f"no file in {model_dir} matches origin_file_pattern={self.origin_file_pattern!r}")
        root = os.path.normpath(model_dir.absolute())
        for path in found:
            # Checked patterns cannot escape; keep the invariant explicit in case globbing rules change.
            if os.path.commonpath([root, os.path.normpath(path.absolute())]) != root:
                raise FileNotFoundError(f"{path} lies outside the model folder {model_dir}")
        return sorted(found)
