"""Images in and out: PIL <-> tensors in [-1, 1], and PNGs that carry how they were made, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin

__all__ = ["atomic_path", "format_parameters", "image_to_tensor", "save_image", "tensor_to_images"]


def image_to_tensor(image: Image.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A PIL image as a (1, 3, H, W) tensor in [-1, 1], the range VAEs encode."""
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    tensor = array.view(image.height, image.width, 3).permute(2, 0, 1).unsqueeze(0)
    return (tensor.to(dtype) / 127.5 - 1).contiguous()


def tensor_to_images(tensor: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] to PIL images, rounding to the nearest 8-bit value."""
    pixels = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy()) for frame in pixels]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it only if the block succeeds; never a half-written file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def format_parameters(parameters: Mapping[str, object]) -> str:
    """The ``parameters`` text other tools read: prompt, a negative prompt line, then ``Key: value`` pairs."""
    lines = [str(parameters.get("prompt", ""))]
    if parameters.get("negative_prompt"):
        lines.append(f"Negative prompt: {parameters['negative_prompt']}")
    pairs = [
        f"{key.replace('_', ' ').capitalize()}: {value}"
        for key, value in parameters.items()
        if key not in ("prompt", "negative_prompt") and value is not None
    ]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def save_image(image: Image.Image, path: str | os.PathLike, parameters: Mapping[str, object] | None = None) -> Path:
    """Save a PNG with the generation parameters as a ``parameters`` text chunk and as JSON (``diffsynth``).

    ``parameters`` defaults to what the pipeline attached to the image (``image.info["diffsynth"]``).
    """
    path = Path(path)
    if parameters is None:
        parameters = json.loads(image.info.get("diffsynth", "{}"))
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", format_parameters(parameters))
        info.add_text("diffsynth", json.dumps(dict(parameters), default=str))
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=info)
    return path
