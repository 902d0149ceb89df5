"""Datasets: folders with captions, metadata tables, broken rows reported by row and file, buckets."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from ds_train import DatasetError, ImageDataset, bucket_size
from tests.train.conftest import write_dataset


def test_folder_with_captions(tmp_path):
    captions = write_dataset(tmp_path, size=40)
    dataset = ImageDataset(tmp_path, 32, 48)
    assert len(dataset) == len(captions) == 8
    item = dataset[0]
    assert item["pixels"].shape == (3, 32, 48)
    assert -1.0 <= item["pixels"].min() < item["pixels"].max() <= 1.0
    assert sorted(s.caption for s in dataset.samples) == sorted(captions)
    assert "8 samples" in dataset.describe()


def test_metadata_tables_and_trigger(tmp_path):
    write_dataset(tmp_path, size=16)
    rows = [{"file_name": "red_square.png", "prompt": "[trigger] a red square"}, {"image": "", "prompt": "x"}]
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:1]))
    dataset = ImageDataset(tmp_path / "meta.jsonl", 16, 16, trigger="sks")
    assert dataset.samples[0].caption == "sks a red square"
    (tmp_path / "metadata.csv").write_text("image,text\nred_square.png,a red square\nblue_circle.png,a blue circle\n")
    dataset = ImageDataset(tmp_path, 16, 16, repeats=3)  # a folder with metadata.csv reads the table
    assert [s.caption for s in dataset.samples] == ["a red square", "a blue circle"] and len(dataset) == 6
    (tmp_path / "list.json").write_text(json.dumps([{"file": "red_square.png", "caption": "c"}]))
    assert ImageDataset(tmp_path / "list.json", 16, 16).samples[0].caption == "c"


def test_broken_rows_are_listed_with_row_and_file(tmp_path):
    write_dataset(tmp_path, size=16)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    (tmp_path / "metadata.csv").write_text(
        "image,prompt\n"
        "red_square.png,fine\n"
        "missing.png,a missing file\n"
        "broken.png,an unreadable file\n"
        "blue_circle.png,\n"
    )
    with pytest.raises(DatasetError) as error:
        ImageDataset(tmp_path, 16, 16)
    message = str(error.value)
    assert "3 broken row(s)" in message
    assert "metadata.csv row 2" in message and "missing.png: file not found" in message
    assert "metadata.csv row 3" in message and "unreadable image" in message
    assert "metadata.csv row 4" in message and "empty caption" in message
    with pytest.warns(UserWarning, match="dropped 3 broken row"):
        dataset = ImageDataset(tmp_path, 16, 16, skip_broken=True)
    assert [s.caption for s in dataset.samples] == ["fine"]
    assert "dropped" in dataset.describe()


def test_folder_without_caption_file_is_reported(tmp_path):
    write_dataset(tmp_path, size=16)
    (tmp_path / "green_circle.txt").unlink()
    (tmp_path / "red_circle.txt").write_text("  \n")
    with pytest.raises(DatasetError, match=r"green_circle\.png: no caption file green_circle\.txt") as error:
        ImageDataset(tmp_path, 16, 16)
    assert "red_circle.png: empty caption" in str(error.value)


def test_buckets_keep_aspect_and_batch_by_size(tmp_path):
    for index, size in enumerate([(64, 32), (32, 64), (64, 32), (32, 32)]):
        Image.new("RGB", size, (index * 40, 0, 0)).save(tmp_path / f"{index}.png")
        (tmp_path / f"{index}.txt").write_text(f"image {index}")
    dataset = ImageDataset(tmp_path, 32, 32, buckets=True)
    assert bucket_size(64, 32, 32 * 32) == (48, 16)
    shapes = {tuple(dataset[i]["pixels"].shape[1:]) for i in range(4)}
    assert len(shapes) == 3  # landscape, portrait, square: nothing cropped to a square
    for batch in dataset.batches(2, torch.Generator().manual_seed(0)):
        assert len({dataset.sizes[i] for i in batch}) == 1
