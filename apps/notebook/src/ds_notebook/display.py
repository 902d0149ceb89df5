"""Image grids and inline videos as objects Jupyter renders (``_repr_html_``), and that work without a kernel.

Nothing here imports IPython: a notebook displays the returned object when it is a cell's last expression
(or through ``display(...)``); outside Jupyter the same object gives the composed PIL image (``.image``), the
HTML (``.html``) or saves itself (``.save(path)``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["ImageGrid", "VideoPlayer", "show_images", "show_video"]

CAPTION_HEIGHT = 18


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _caption_of(image: Image.Image) -> str:
    """A default caption from the parameters a pipeline attached: ``seed 3`` (and the prompt when short)."""
    try:
        parameters = json.loads(image.info.get("diffsynth", "{}"))
    except (TypeError, ValueError):
        return ""
    parts = []
    if parameters.get("prompt") and len(parameters["prompt"]) <= 40:
        parts.append(str(parameters["prompt"]))
    if parameters.get("seed") is not None:
        parts.append(f"seed {parameters['seed']}")
    return ", ".join(parts)


class ImageGrid:
    """Images in a grid with captions. ``image``: the composed PIL image; ``html``: what Jupyter shows."""

    def __init__(self, images: Sequence[Image.Image], captions: Sequence[str], columns: int, cell_size: int):
        self.images = list(images)
        self.captions = list(captions)
        self.columns = columns
        self.cell_size = cell_size

    @property
    def image(self) -> Image.Image:
        """One PIL image: each picture scaled to fit a ``cell_size`` square, its caption below it."""
        rows = -(-len(self.images) // self.columns)
        has_captions = any(self.captions)
        cell_height = self.cell_size + (CAPTION_HEIGHT if has_captions else 0)
        grid = Image.new("RGB", (self.columns * self.cell_size, rows * cell_height), "white")
        draw = ImageDraw.Draw(grid)
        for index, (picture, caption) in enumerate(zip(self.images, self.captions, strict=True)):
            thumbnail = picture.convert("RGB")
            thumbnail.thumbnail((self.cell_size, self.cell_size), Image.Resampling.LANCZOS)
            x = (index % self.columns) * self.cell_size
            y = (index // self.columns) * cell_height
            grid.paste(thumbnail, (x + (self.cell_size - thumbnail.width) // 2, y))
            if caption:
                draw.text((x + 2, y + self.cell_size + 3), caption, fill="black")
        return grid

    @property
    def html(self) -> str:
        cells = []
        for picture, caption in zip(self.images, self.captions, strict=True):
            label = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
            cells.append(
                f'<figure style="margin:0;text-align:center"><img src="data:image/png;base64,{_png_base64(picture)}" '
                f'style="max-width:{self.cell_size}px;max-height:{self.cell_size}px"/>{label}</figure>'
            )
        style = f"display:grid;grid-template-columns:repeat({self.columns}, auto);gap:8px;justify-content:start"
        return f'<div style="{style}">{"".join(cells)}</div>'

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str | os.PathLike) -> Path:
        self.image.save(path)
        return Path(path)

    def __repr__(self) -> str:
        return f"ImageGrid({len(self.images)} images, {self.columns} columns)"


def show_images(
    images: Image.Image | str | os.PathLike | Sequence[Image.Image | str | os.PathLike],
    captions: Sequence[str] | None = None,
    columns: int = 4,
    cell_size: int = 256,
) -> ImageGrid:
    """A grid of PIL images (or image files), with captions (default: prompt and seed from the metadata).

    Jupyter shows the returned grid when it is the cell's last expression; ``.image`` is the composed picture.
    """
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    loaded = []
    for item in images:
        if isinstance(item, Image.Image):
            loaded.append(item)
        else:
            with Image.open(item) as opened:
                opened.load()
                loaded.append(opened.copy())
    if not loaded:
        raise ValueError("show_images needs at least one image")
    if captions is None:
        captions = [_caption_of(image) for image in loaded]
    elif len(captions) != len(loaded):
        raise ValueError(f"show_images: {len(captions)} captions for {len(loaded)} images; give one per image")
    if columns < 1 or cell_size < 1:
        raise ValueError(f"show_images: columns={columns} and cell_size={cell_size} must be at least 1")
    return ImageGrid(loaded, [str(c) for c in captions], min(columns, len(loaded)), cell_size)


class VideoPlayer:
    """A video for inline playback: ``data`` is mp4 (``mime`` video/mp4) or an animated GIF (image/gif)."""

    def __init__(self, data: bytes, mime: str, width: int | None = None):
        self.data = data
        self.mime = mime
        self.width = width

    @property
    def html(self) -> str:
        encoded = base64.b64encode(self.data).decode("ascii")
        width = f' width="{self.width}"' if self.width else ""
        if self.mime == "image/gif":
            return f'<img src="data:image/gif;base64,{encoded}"{width}/>'
        return f'<video controls autoplay loop muted playsinline{width} src="data:video/mp4;base64,{encoded}"></video>'

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str | os.PathLike) -> Path:
        Path(path).write_bytes(self.data)
        return Path(path)

    def __repr__(self) -> str:
        return f"VideoPlayer({self.mime}, {len(self.data)} bytes)"


def _gif(frames: Sequence[Image.Image], fps: float) -> bytes:
    buffer = io.BytesIO()
    first, *rest = [frame.convert("RGB") for frame in frames]
    first.save(buffer, format="GIF", save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def _mp4(frames: Sequence[Image.Image], fps: float) -> bytes | None:
    """H.264 through ds-pipelines' ``save_video``; None when imageio-ffmpeg is not installed or sizes are odd."""
    from ds_pipelines.media import save_video

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "video.mp4"
        try:
            save_video(list(frames), path, fps=fps, progress_bar=False)
        except (ImportError, ValueError):
            return None
        return path.read_bytes()


def show_video(
    video: Sequence[Image.Image] | str | os.PathLike,
    fps: float | None = None,
    width: int | None = None,
    format: str = "auto",
) -> VideoPlayer:
    """Play frames (a list of PIL images, e.g. a video pipeline's result) or an mp4 file inline.

    fps: frames per second (default: the frames' own ``fps``, else 16). format: ``"mp4"``, ``"gif"`` or
    ``"auto"`` (mp4 when imageio-ffmpeg is installed and the size is even, else an animated GIF).
    """
    if format not in ("auto", "mp4", "gif"):
        raise ValueError(f"show_video: format={format!r} must be 'auto', 'mp4' or 'gif'")
    if isinstance(video, (str, os.PathLike)):
        path = Path(video)
        if not path.is_file():
            raise FileNotFoundError(f"show_video: no such file {path}")
        if path.suffix.lower() == ".gif":
            return VideoPlayer(path.read_bytes(), "image/gif", width)
        return VideoPlayer(path.read_bytes(), "video/mp4", width)
    frames = list(video)
    if not frames:
        raise ValueError("show_video needs at least one frame")
    fps = fps or getattr(video, "fps", None) or 16
    if fps <= 0:
        raise ValueError(f"show_video: fps={fps} must be > 0")
    if format != "gif":
        data = _mp4(frames, fps)
        if data is not None:
            return VideoPlayer(data, "video/mp4", width)
        if format == "mp4":
            raise ValueError("show_video: cannot encode mp4 (imageio-ffmpeg missing, or odd width/height); use gif")
    return VideoPlayer(_gif(frames, fps), "image/gif", width)
