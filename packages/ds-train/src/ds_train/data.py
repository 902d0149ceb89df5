"""Image and video caption datasets: a folder with same-name ``.txt`` captions, or a metadata.csv/.json/.jsonl table.

Video models (``num_frames`` set) also read video files, and treat images as one-frame clips. Every row is checked
when the dataset is built (the file exists, the image or video opens, the caption is not empty), so
a broken row is reported with its row number and file before any model is loaded, instead of failing hours into
a run. Broken rows are fatal by default (one error lists them all) or dropped with a warning.

Metadata tables may also carry extra images per sample, for models conditioned on more than a prompt (see
``EXTRA_IMAGE_ROLES``): ``edit_image`` (one path; in JSON/JSONL also a list; more in columns ``edit_image_2``,
``edit_image_3``, ...), ``control_image`` and ``inpaint_mask``. They are checked like the main image, loaded per
sample into ``item["extras"]`` and handed to the family's training adapter, which encodes them into conditions.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["EXTRA_IMAGE_ROLES", "BrokenRow", "DatasetError", "ExtraImages", "ImageDataset", "Sample", "bucket_size"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v")
FILE_COLUMNS = ("image", "video", "file_name", "file", "path")
TEXT_COLUMNS = ("text", "prompt", "caption")
METADATA_NAMES = ("metadata.jsonl", "metadata.json", "metadata.csv")
TRIGGER = "[trigger]"
# Extra images a metadata row may name, by role (the column name). How each is loaded:
#   edit_image:    reference images of an edit model, in order; kept at their own size and aspect ratio, since the
#                  family's pipeline resizes them its own way (several per row: a JSON list, or edit_image_2, ...)
#   control_image: a control map (canny, depth, ...) or the picture to repaint; resized and cropped like the image
#   inpaint_mask:  white = repaint; one channel in [0, 1], resized and cropped like the image
EXTRA_IMAGE_ROLES = ("edit_image", "control_image", "inpaint_mask")
_NUMBERED_EDIT = re.compile(r"^edit_image_(\d+)$")

# One sample's extra images by role: (3, h, w) float32 in [-1, 1] (masks (1, H, W) in [0, 1]), no batch dimension.
ExtraImages = Mapping[str, list[torch.Tensor]]


@dataclass(frozen=True)
class Sample:
    """One usable row: the image file and its caption; ``origin`` says where it came from (for messages).
    ``extras`` maps an extra image role (``EXTRA_IMAGE_ROLES``) to its files, in order."""

    image: Path
    caption: str
    origin: str
    extras: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class BrokenRow:
    origin: str  # "metadata.csv row 7" or the image's file name
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}: {self.file}: {self.reason}"


class DatasetError(ValueError):
    """The dataset has broken rows; ``rows`` lists them."""

    def __init__(self, source: Path, rows: Sequence[BrokenRow]):
        self.rows = list(rows)
        listed = "\n  ".join(str(row) for row in self.rows[:50])
        more = f"\n  ... and {len(self.rows) - 50} more" if len(self.rows) > 50 else ""
        super().__init__(
            f"{source}: {len(self.rows)} broken row(s); fix them or pass skip_broken=True (--skip-broken) to drop "
            f"them:\n  {listed}{more}"
        )


def bucket_size(width: int, height: int, pixels: int, multiple: int = 16) -> tuple[int, int]:
    """The (width, height) near ``width:height`` with about ``pixels`` pixels, both multiples of ``multiple``."""
    aspect = width / height
    target_h = math.sqrt(pixels / aspect)
    target_w = target_h * aspect
    return (
        max(multiple, round(target_w / multiple) * multiple),
        max(multiple, round(target_h / multiple) * multiple),
    )


def _resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale so the image covers ``width x height``, then cut the centre."""
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.Resampling.BICUBIC
    )
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float().div(127.5).sub(1)


def _load_extra(role: str, path: Path, width: int, height: int) -> torch.Tensor:
    """One extra image as the adapter receives it (see ``EXTRA_IMAGE_ROLES``)."""
    with Image.open(path) as image:
        if role == "inpaint_mask":
            mask = _resize_crop(image.convert("L"), width, height)
            data = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8)
            return data.view(1, height, width).float().div(255)
        if role == "edit_image":
            return _to_tensor(image.convert("RGB"))
        return _to_tensor(_resize_crop(image.convert("RGB"), width, height))


class ImageDataset(torch.utils.data.Dataset):
    """Images (and, for video models, clips) with captions, resized and centre-cropped to ``height x width``.

    Items are dicts ``{"pixels": (3, H, W) float32 in [-1, 1], "prompt": str, "index": int, "extras": {role:
    [tensor, ...]}}`` (``extras`` is empty unless the metadata names extra images: ``ExtraImages``); with
    ``num_frames`` set, ``pixels`` is ``(3, F, H, W)``: a video's first ``num_frames`` frames taken every
    ``frame_stride``-th frame (a shorter clip keeps the longest count of the form ``1 + k * temporal_compression``
    it holds, as Wan's VAE needs), and an image is a clip of one frame. With ``buckets=True`` each file keeps its
    aspect ratio at about ``height * width`` pixels (sides multiples of 16); use ``batches()`` to draw batches whose
    items share a shape. ``trigger`` replaces ``[trigger]`` in captions (and is prepended when ``prepend_trigger``).
    ``repeats`` lists every row that many times.
    """

    def __init__(
        self,
        source: str | os.PathLike,
        height: int = 1024,
        width: int = 1024,
        *,
        buckets: bool = False,
        skip_broken: bool = False,
        trigger: str | None = None,
        prepend_trigger: bool = False,
        repeats: int = 1,
        require_captions: bool = True,
        num_frames: int | None = None,
        frame_stride: int = 1,
        temporal_compression: int = 4,
    ):
        self.source = Path(source)
        self.height, self.width, self.buckets, self.repeats = height, width, buckets, repeats
        self.num_frames, self.frame_stride = num_frames, frame_stride
        if num_frames is not None and (num_frames < 1 or (num_frames - 1) % temporal_compression):
            raise ValueError(f"num_frames={num_frames!r} must be of the form 1 + k * {temporal_compression}")
        rows, broken = _read_rows(self.source, require_captions, videos=num_frames is not None)
        samples, sizes, frames = [], [], []
        for row in rows:
            if _is_video(row.image):
                size, count, problem = self._check_video(row.image, temporal_compression)
            else:
                (size, problem), count = _check_image(row.image), 1
            if problem:
                broken.append(BrokenRow(row.origin, str(row.image), problem))
                continue
            extra_problem = _check_extras(row)
            if extra_problem is not None:
                broken.append(extra_problem)
                continue
            caption = row.caption
            if trigger is not None:
                caption = caption.replace(TRIGGER, trigger)
                if prepend_trigger and trigger not in caption:
                    caption = f"{trigger}, {caption}" if caption else trigger
            samples.append(Sample(row.image, caption, row.origin, row.extras))
            sizes.append(bucket_size(*size, height * width) if buckets else (width, height))
            frames.append(count)
        if broken and not skip_broken:
            raise DatasetError(self.source, broken)
        if broken:
            listed = "\n  ".join(str(row) for row in broken[:20])
            warnings.warn(f"{self.source}: dropped {len(broken)} broken row(s):\n  {listed}", stacklevel=2)
        if not samples:
            raise ValueError(f"{self.source}: no usable files (found {len(broken)} broken rows)")
        self.samples, self.sizes, self.frames, self.broken = samples, sizes, frames, broken
        # The extra image roles the samples carry (a table column applies to every row, so all or none have one).
        self.extra_roles = frozenset(role for sample in samples for role in sample.extras)

    def _check_video(self, path: Path, temporal_compression: int) -> tuple[tuple[int, int], int, str | None]:
        """(size, frames this clip gives, problem): the clip's frame count at the stride, cut to 1 + k * t."""
        if self.num_frames is None:
            return (0, 0), 0, "a video; this model trains on images (num_frames is not set)"
        if not path.is_file():
            return (0, 0), 0, "file not found"
        from ds_pipelines.media import probe_video

        try:
            info = probe_video(path)
        except ValueError as error:
            return (0, 0), 0, f"unreadable video: {str(error).split(': ', 1)[-1]}"
        available = (info.frames + self.frame_stride - 1) // self.frame_stride
        if available < 1:
            return (0, 0), 0, "the video has no frames"
        usable = min(self.num_frames, (available - 1) // temporal_compression * temporal_compression + 1)
        return (info.width, info.height), usable, None

    def describe(self) -> str:
        """One line for the run log: how many samples are used and how many were dropped, and why."""
        videos = sum(1 for sample in self.samples if _is_video(sample.image))
        text = f"dataset {self.source}: {len(self.samples)} samples"
        if videos:
            short = sum(
                1
                for count, sample in zip(self.frames, self.samples, strict=True)
                if _is_video(sample.image) and count < (self.num_frames or 1)
            )
            text += f" ({videos} videos, {len(self.samples) - videos} images"
            text += f"; {short} clips shorter than {self.num_frames} frames)" if short else ")"
        for role in sorted(self.extra_roles, key=EXTRA_IMAGE_ROLES.index):
            counts = sorted({len(sample.extras.get(role, ())) for sample in self.samples})
            per_row = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
            text += f", {per_row} {role} per row"
        if self.repeats > 1:
            text += f" x {self.repeats} repeats"
        if self.buckets:
            text += f" in {len(set(self.sizes))} size bucket(s)"
        if self.broken:
            reasons: dict[str, int] = {}
            for row in self.broken:
                reasons[row.reason.split(":")[0]] = reasons.get(row.reason.split(":")[0], 0) + 1
            text += "; dropped " + ", ".join(f"{n} ({r})" for r, n in reasons.items())
        return text

    def __len__(self) -> int:
        return len(self.samples) * self.repeats

    def __getitem__(self, index: int) -> dict:
        row = index % len(self.samples)
        sample = self.samples[row]
        width, height = self.sizes[row]
        if _is_video(sample.image):
            from ds_pipelines.media import load_video

            clip = load_video(sample.image, self.frames[row], stride=self.frame_stride, read_parameters=False)
            if len(clip) < self.frames[row]:
                raise ValueError(f"{sample.origin}: {sample.image} gave {len(clip)} of {self.frames[row]} frames")
            pixels = torch.stack([_to_tensor(_resize_crop(frame, width, height)) for frame in clip], dim=1)
        else:
            with Image.open(sample.image) as image:
                pixels = _to_tensor(_resize_crop(image.convert("RGB"), width, height))
            if self.num_frames is not None:
                pixels = pixels[:, None]
        extras = {
            role: [_load_extra(role, path, width, height) for path in paths] for role, paths in sample.extras.items()
        }
        return {"pixels": pixels, "prompt": sample.caption, "index": row, "extras": extras}

    def shape_of(self, row: int) -> tuple[int, int, int]:
        """(width, height, frames) of a row's items: batches are drawn within one shape."""
        return (*self.sizes[row], self.frames[row])

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
        """One epoch of shuffled index batches; items of a batch share a shape (size bucket and frame count)."""
        order = torch.randperm(len(self), generator=generator).tolist()
        if len({self.shape_of(row) for row in range(len(self.samples))}) == 1:
            for start in range(0, len(order), batch_size):
                yield order[start : start + batch_size]
            return
        groups: dict[tuple[int, int, int], list[int]] = {}
        for index in order:
            group = groups.setdefault(self.shape_of(index % len(self.samples)), [])
            group.append(index)
            if len(group) == batch_size:
                yield list(group)
                group.clear()
        for group in groups.values():
            if group:
                yield group


def collate(items: list[dict]) -> dict:
    """Stack pixels; list prompts, indices and each item's extras (per sample: their sizes may differ)."""
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "prompt": [item["prompt"] for item in items],
        "index": torch.tensor([item["index"] for item in items]),
        "extras": [item.get("extras", {}) for item in items],
    }


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def _check_image(path: Path) -> tuple[tuple[int, int], str | None]:
    if not path.is_file():
        return (0, 0), "file not found"
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return (0, 0), f"unreadable image: {error}"
    return size, None


def _check_extras(row: Sample) -> BrokenRow | None:
    """The first extra image of a row that is missing or does not open, as a broken row naming its column."""
    for role, paths in row.extras.items():
        for path in paths:
            _, problem = _check_image(path)
            if problem:
                return BrokenRow(row.origin, str(path), f"{role}: {problem}")
    return None


def _read_rows(source: Path, require_captions: bool, videos: bool = False) -> tuple[list[Sample], list[BrokenRow]]:
    if source.is_dir():
        for name in METADATA_NAMES:
            if (source / name).is_file():
                return _read_table(source / name, require_captions)
        return _read_folder(source, require_captions, videos)
    if source.is_file():
        return _read_table(source, require_captions)
    raise FileNotFoundError(f"dataset not found: {source} (a folder of images, or metadata.csv/.json/.jsonl)")


def _read_folder(folder: Path, require_captions: bool, videos: bool = False) -> tuple[list[Sample], list[BrokenRow]]:
    rows, broken = [], []
    suffixes = IMAGE_SUFFIXES + (VIDEO_SUFFIXES if videos else ())
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    if not images:
        kinds = "images or videos" if videos else "images"
        raise ValueError(f"{folder}: no {kinds} ({', '.join(suffixes)}) and no metadata.csv/.json/.jsonl")
    for image in images:
        caption_file = image.with_suffix(".txt")
        origin = str(image.relative_to(folder))
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else ""
        if not caption and require_captions:
            reason = "empty caption" if caption_file.is_file() else f"no caption file {caption_file.name}"
            broken.append(BrokenRow(origin, str(image), reason))
            continue
        rows.append(Sample(image, caption, origin))
    return rows, broken


def _table_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as handle:
                return list(csv.DictReader(handle))
        if suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [json.loads(line) if line.strip() else {} for line in lines]
        if suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(records, list):
                raise ValueError("expected a JSON list of objects")
            return records
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot parse: {error}") from error
    raise ValueError(f"{path}: unsupported metadata file; use .csv, .json or .jsonl")


def _read_table(path: Path, require_captions: bool) -> tuple[list[Sample], list[BrokenRow]]:
    records = _table_records(path)
    if not records:
        raise ValueError(f"{path}: the metadata has no rows")
    columns = {key for record in records if isinstance(record, dict) for key in record}
    file_column = next((c for c in FILE_COLUMNS if c in columns), None)
    text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
    if file_column is None:
        raise ValueError(f"{path}: no image column; name one of {', '.join(FILE_COLUMNS)} (found {sorted(columns)})")
    if text_column is None and require_captions:
        raise ValueError(f"{path}: no caption column; name one of {', '.join(TEXT_COLUMNS)} (found {sorted(columns)})")
    extra_columns = _extra_columns(columns)
    rows, broken = [], []
    # Rows count from 1 after a CSV header (row 1 is the first data row); JSON(L) rows are list/line numbers.
    for number, record in enumerate(records, start=1):
        origin = f"{path.name} row {number}"
        if not isinstance(record, dict) or not record:
            broken.append(BrokenRow(origin, "", "not an object with columns"))
            continue
        file = str(record.get(file_column) or "").strip()
        caption = str(record.get(text_column) or "").strip() if text_column else ""
        if not file:
            broken.append(BrokenRow(origin, "", f"empty {file_column!r}"))
            continue
        image = Path(file) if Path(file).is_absolute() else path.parent / file
        if not caption and require_captions:
            broken.append(BrokenRow(origin, str(image), f"empty caption ({text_column!r})"))
            continue
        extras, problem = _row_extras(record, extra_columns, path.parent)
        if problem:
            broken.append(BrokenRow(origin, str(image), problem))
            continue
        rows.append(Sample(image, caption, origin, extras))
    return rows, broken


def _extra_columns(columns: set[str]) -> dict[str, list[str]]:
    """Role -> the table's columns for it, in order (``edit_image`` first, then ``edit_image_2``, ``_3``, ...)."""
    found: dict[str, list[str]] = {}
    numbered = sorted((int(m.group(1)), c) for c in columns if (m := _NUMBERED_EDIT.match(c)))
    edit = (["edit_image"] if "edit_image" in columns else []) + [column for _, column in numbered]
    if edit:
        found["edit_image"] = edit
    for role in EXTRA_IMAGE_ROLES[1:]:
        if role in columns:
            found[role] = [role]
    return found


def _row_extras(
    record: dict, extra_columns: dict[str, list[str]], folder: Path
) -> tuple[dict[str, tuple[Path, ...]], str | None]:
    """A row's extra image paths by role, or the reason the row is broken. A role the table has a column for needs
    a file in every row (``edit_image_2``, ... may be empty: rows differ in how many edit images they have)."""
    extras: dict[str, tuple[Path, ...]] = {}
    for role, columns in extra_columns.items():
        files: list[str] = []
        for column in columns:
            value = record.get(column)
            values = value if isinstance(value, list) else [value]
            if role != "edit_image" and len(values) != 1:
                return {}, f"{column!r} must be one file, got a list of {len(values)}"
            for item in values:
                if item is not None and not isinstance(item, str):
                    return {}, f"{column!r} holds {item!r}, not a file path"
                if item and item.strip():
                    files.append(item.strip())
        if not files:
            return {}, f"empty {columns[0]!r}"
        extras[role] = tuple(Path(f) if Path(f).is_absolute() else folder / f for f in files)
    return extras, None
