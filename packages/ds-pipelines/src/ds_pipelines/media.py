"""Images and videos in and out: PIL <-> tensors in [-1, 1], PNGs and mp4s that carry how they were made, written
atomically. Video files go through imageio-ffmpeg, imported only when a video is read or written (the ``[video]``
and ``[wan]`` extras install it)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from tqdm.auto import tqdm

from ds_loader.files import atomic_file

__all__ = [
    "VideoFrames",
    "VideoInfo",
    "format_parameters",
    "image_to_tensor",
    "load_video",
    "metadata_json",
    "probe_video",
    "save_image",
    "save_video",
    "tensor_to_images",
]


def image_to_tensor(image: Image.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A PIL image as a (1, 3, H, W) tensor in [-1, 1], the range VAEs encode."""
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    tensor = array.view(image.height, image.width, 3).permute(2, 0, 1).unsqueeze(0)
    return (tensor.to(dtype) / 127.5 - 1).contiguous()


def tensor_to_images(tensor: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] to PIL images, rounding to the nearest 8-bit value."""
    pixels = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(frame.permute(1, 2, 0).contiguous().numpy()) for frame in pixels]


def metadata_json(parameters: Mapping[str, object]) -> str:
    """Generation parameters as strict JSON: a non-finite number (NaN, infinity) is written as the string
    ``"nan"``, ``"inf"`` or ``"-inf"`` (``float()`` reads it back), never as a bare ``NaN`` no JSON parser accepts;
    values JSON has no type for are written as their ``str``."""
    return json.dumps(_finite(dict(parameters)), default=str, allow_nan=False)


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(float(value))
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


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


def save_image(
    image: Image.Image,
    path: str | os.PathLike,
    parameters: Mapping[str, object] | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Save a PNG with the generation parameters as a ``parameters`` text chunk and as JSON (``diffsynth``,
    ``metadata_json``: NaN and infinities become strings); returns the path written.

    ``parameters`` defaults to what the pipeline attached to the image (``image.info["diffsynth"]``).
    overwrite=False never replaces a file: a taken name (also one taken by a run finishing at the same moment)
    gives ``name-1.png``, ``name-2.png``, ... The file appears complete or not at all, with the umask's mode.
    """
    if parameters is None:
        parameters = json.loads(image.info.get("diffsynth", "{}"))
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", format_parameters(parameters))
        info.add_text("diffsynth", metadata_json(parameters))
    with atomic_file(path, overwrite=overwrite, clean_leftovers=True) as pending:
        image.save(pending.temporary, format="PNG", pnginfo=info)
    return pending.path


class VideoFrames(list):
    """A list of PIL frames that also knows its frame rate and how it was made (``parameters``, JSON-able)."""

    def __init__(self, frames=(), fps: float | None = None, parameters: Mapping[str, object] | None = None):
        super().__init__(frames)
        self.fps = fps
        self.parameters = dict(parameters) if parameters else {}


def _imageio_ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError as error:  # the optional extra
        raise ImportError(
            "reading and writing video needs imageio-ffmpeg; install it with `pip install ds-pipelines[video]` "
            "(or the model family's extra, e.g. `ds-pipelines[wan]`)"
        ) from error
    return imageio_ffmpeg


def save_video(
    frames: list[Image.Image],
    path: str | os.PathLike,
    fps: float | None = None,
    metadata: Mapping[str, object] | None = None,
    quality: float = 7,
    progress_bar: bool = True,
    *,
    overwrite: bool = True,
) -> Path:
    """Write frames as an H.264 mp4 (yuv420p, plays everywhere), atomically, with the parameters in its metadata;
    returns the path written.

    fps: frames per second; None takes the pipeline's (``VideoFrames.fps``: the model's native rate, 16 for Wan 2.1,
        24 for Wan2.2-TI2V-5B). metadata: JSON-able generation parameters stored as the file's ``comment`` tag
        (``ffprobe`` shows it); None takes ``VideoFrames.parameters``. quality: imageio-ffmpeg's 1-10 scale
        (10 best; H.264 CRF ``51 * (1 - quality / 10)``). Width and height must be even (yuv420p halves chroma).
        overwrite=False: never replace a file; a taken name gives ``name-1.mp4``, ... (as in ``save_image``).
    Nothing is left at ``path`` (nor beside it) when encoding fails. Metadata is strict JSON (``metadata_json``).
    """
    if fps is None:
        fps = getattr(frames, "fps", None)
    if metadata is None:
        metadata = getattr(frames, "parameters", None) or {}
    frames = list(frames)
    if not frames:
        raise ValueError(f"save_video({path}): no frames to write")
    if fps is None:
        raise ValueError(f"save_video({path}): pass fps=... (these frames do not carry a frame rate)")
    if not fps > 0:
        raise ValueError(f"save_video({path}): fps={fps!r} must be > 0")
    if not 1 <= quality <= 10:
        raise ValueError(f"save_video({path}): quality={quality!r} must be between 1 and 10")
    width, height = frames[0].size
    if width % 2 or height % 2:
        raise ValueError(f"save_video({path}): frames are {width}x{height}; H.264 yuv420p needs even sizes")
    for index, frame in enumerate(frames):
        if frame.size != (width, height):
            raise ValueError(
                f"save_video({path}): frame {index} is {frame.size[0]}x{frame.size[1]}, not {width}x{height}"
            )
    imageio_ffmpeg = _imageio_ffmpeg()
    output_params = ["-f", "mp4", "-movflags", "+faststart"]
    if metadata:
        output_params += ["-metadata", f"comment={metadata_json(metadata)}"]
    with atomic_file(path, overwrite=overwrite, clean_leftovers=True) as pending:
        writer = imageio_ffmpeg.write_frames(
            str(pending.temporary),
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=quality,
            macro_block_size=1,
            ffmpeg_log_level="error",
            output_params=output_params,
        )
        writer.send(None)
        try:
            for frame in tqdm(frames, desc="encoding video", unit="frame", disable=not progress_bar):
                writer.send(frame.convert("RGB").tobytes())
        finally:
            writer.close()
    return pending.path


def load_video(
    path: str | os.PathLike, max_frames: int | None = None, *, stride: int = 1, read_parameters: bool = True
) -> VideoFrames:
    """Frames of a video file as RGB PIL images, with its ``fps`` and the JSON ``comment`` tag ``save_video`` wrote.

    stride: keep every ``stride``-th frame (a 30 fps clip read at stride 2 moves like 15 fps); max_frames counts
    kept frames. read_parameters=False skips the extra ffmpeg call that reads the comment (data loaders).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride={stride!r} must be an integer >= 1")
    imageio_ffmpeg = _imageio_ffmpeg()
    reader = imageio_ffmpeg.read_frames(str(path))
    info = next(reader)
    width, height = info["size"]
    parameters = _video_comment(imageio_ffmpeg, path) if read_parameters else {}
    fps = info.get("fps")
    frames = VideoFrames(fps=fps / stride if fps else fps, parameters=parameters)
    try:
        for index, data in enumerate(reader):
            if index % stride:
                continue
            frames.append(Image.frombytes("RGB", (width, height), data))
            if max_frames is not None and len(frames) >= max_frames:
                break
    finally:
        reader.close()
    return frames


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe_video`` reads: frame count, size and frame rate."""

    frames: int
    width: int
    height: int
    fps: float | None


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, size and fps of a video without keeping its frames (ffmpeg decodes it once, in C).

    Raises ``ValueError`` naming the file when ffmpeg cannot read it, so a dataset can list it as a broken row.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    imageio_ffmpeg = _imageio_ffmpeg()
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        info = next(reader)
        reader.close()
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except (OSError, RuntimeError, StopIteration, KeyError) as error:
        lines = str(error).strip().splitlines()
        raise ValueError(f"{path}: not a readable video: {lines[-1] if lines else type(error).__name__}") from error
    width, height = info["size"]
    return VideoInfo(int(frames), int(width), int(height), info.get("fps"))


def _video_comment(imageio_ffmpeg, path: Path) -> dict:
    """The ``comment`` tag as JSON ({} when absent or not JSON), through ffmpeg's metadata dump."""
    import subprocess

    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in _unescape_ffmetadata(result.stdout):
        if line.startswith("comment="):
            try:
                value = json.loads(line[len("comment=") :])
            except json.JSONDecodeError:
                return {}
            return value if isinstance(value, dict) else {}
    return {}


def _unescape_ffmetadata(text: str) -> list[str]:
    """Lines of an ffmetadata dump, with ffmpeg's backslash escapes (of = ; # \\ and newline) undone."""
    lines, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(char)
    lines.append("".join(current))
    return lines
