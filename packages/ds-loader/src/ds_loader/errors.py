"""The errors ds-loader raises, so callers can tell a bad file from a wrong model from a bad argument."""

from __future__ import annotations

__all__ = [
    "AmbiguousModelError",
    "CheckpointError",
    "DetectionError",
    "LoaderError",
    "RecipeError",
    "StateDictMismatchError",
    "UnsafePathError",
]


class LoaderError(Exception):
    """Base of every error ds-loader raises on purpose."""


class CheckpointError(LoaderError, ValueError):
    """A checkpoint file or folder cannot be read as weights; the message names the file."""


class UnsafePathError(LoaderError, ValueError):
    """A model id or file pattern would reach outside the model directory."""


class DetectionError(LoaderError, LookupError):
    """No registered model spec recognises a checkpoint; the message lists the closest specs and why."""


class AmbiguousModelError(DetectionError):
    """Several specs (or components) match and the caller did not say which one to load."""


class RecipeError(LoaderError, ValueError):
    """A conversion recipe cannot produce a tensor from the source (missing part, incompatible shapes)."""


class StateDictMismatchError(LoaderError, ValueError):
    """A checkpoint's tensors do not fit the model: missing, unexpected and mis-shaped keys, all at once.

    The lists are kept on the error so tools can show them all: ``missing`` and ``unexpected`` key names,
    ``mismatched`` as ``(key, file shape, model shape)``, and ``uncomputable`` converted keys whose recipe
    cannot be evaluated (a source part is absent or shapes disagree), each with the reason.
    """

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        uncomputable: list[str] | None = None,
    ):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
        self.uncomputable = uncomputable or []
