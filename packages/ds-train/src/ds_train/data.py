"""Image-caption datasets: a folder with same-name ``.txt`` captions, or a metadata.csv/.json/.jsonl table.

Every row is checked when the dataset is built (the file exists, the image opens, the caption is not empty), so
a broken row is reported with its row number and file before any model is loaded, instead of failing hours into
a run. Broken rows are fatal by default (one error lists them all) or dropped with a warning.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

__all__ = ["BrokenRow", "DatasetError", "ImageDataset", "Sample", "bucket_size"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
FILE_COLUMNS = ("image", "file_name", "file", "path")
TEXT_COLUMNS = ("text", "prompt", "caption")
METADATA_NAMES = ("metadata.jsonl", "metadata.json", "metadata.csv")
TRIGGER = "[trigger]"


@dataclass(frozen=True)
class Sample:
    """One usable row: the image file and its caption; ``origin`` says where it came from (for messages)."""

    image: Path
    caption: str
    origin: str


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


class ImageDataset(torch.utils.data.Dataset):
    """Images and captions resized and centre-cropped to ``height x width`` (or bucketed; see ``buckets``).

    Items are dicts ``{"pixels": (3, H, W) float32 in [-1, 1], "prompt": str, "index": int}``. With
    ``buckets=True`` each image keeps its aspect ratio at about ``height * width`` pixels (sides multiples of
    16); use ``batches()`` to draw batches whose images share a size. ``trigger`` replaces ``[trigger]`` in
    captions (and is prepended when ``prepend_trigger``). ``repeats`` lists every row that many times.
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
    ):
        self.source = Path(source)
        self.height, self.width, self.buckets, self.repeats = height, width, buckets, repeats
        rows, broken = _read_rows(self.source, require_captions)
        samples, sizes = [], []
        for row in rows:
            size, problem = _check_image(row.image)
            if problem:
                broken.append(BrokenRow(row.origin, str(row.image), problem))
                continue
            caption = row.caption
            if trigger is not None:
                caption = caption.replace(TRIGGER, trigger)
                if prepend_trigger and trigger not in caption:
                    caption = f"{trigger}, {caption}" if caption else trigger
            samples.append(Sample(row.image, caption, row.origin))
            sizes.append(bucket_size(*size, height * width) if buckets else (width, height))
        if broken and not skip_broken:
            raise DatasetError(self.source, broken)
        if broken:
            listed = "\n  ".join(str(row) for row in broken[:20])
            warnings.warn(f"{self.source}: dropped {len(broken)} broken row(s):\n  {listed}", stacklevel=2)
        if not samples:
            raise ValueError(f"{self.source}: no usable images (found {len(broken)} broken rows)")
        self.samples, self.sizes, self.broken = samples, sizes, broken

    def describe(self) -> str:
        """One line for the run log: how many samples are used and how many were dropped, and why."""
        text = f"dataset {self.source}: {len(self.samples)} samples"
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
        with Image.open(sample.image) as image:
            pixels = _to_tensor(_resize_crop(image.convert("RGB"), width, height))
        return {"pixels": pixels, "prompt": sample.caption, "index": row}

    def batches(self, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
        """One epoch of shuffled index batches; with buckets, each batch holds one image size (last ones short)."""
        order = torch.randperm(len(self), generator=generator).tolist()
        if not self.buckets:
            for start in range(0, len(order), batch_size):
                yield order[start : start + batch_size]
            return
        groups: dict[tuple[int, int], list[int]] = {}
        for index in order:
            group = groups.setdefault(self.sizes[index % len(self.samples)], [])
            group.append(index)
            if len(group) == batch_size:
                yield list(group)
                group.clear()
        for group in groups.values():
            if group:
                yield group


def collate(items: list[dict]) -> dict:
    """Stack pixels, list prompts and indices."""
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "prompt": [item["prompt"] for item in items],
        "index": torch.tensor([item["index"] for item in items]),
    }


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


def _read_rows(source: Path, require_captions: bool) -> tuple[list[Sample], list[BrokenRow]]:
    if source.is_dir():
        for name in METADATA_NAMES:
            if (source / name).is_file():
                return _read_table(source / name, require_captions)
        return _read_folder(source, require_captions)
    if source.is_file():
        return _read_table(source, require_captions)
    raise FileNotFoundError(f"dataset not found: {source} (a folder of images, or metadata.csv/.json/.jsonl)")


def _read_folder(folder: Path, require_captions: bool) -> tuple[list[Sample], list[BrokenRow]]:
    rows, broken = [], []
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise ValueError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and no metadata.csv/.json/.jsonl")
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
        rows.append(Sample(image, caption, origin))
    return rows, broken
