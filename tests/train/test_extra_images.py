"""Extra images per sample (edit images, control images, inpaint masks): read from metadata tables, checked when the
dataset is built (a broken row names its row, column and file), loaded per item, handed to the training adapter's
hooks, cached, and kept through caption dropout, where an edit model's empty prompt still sees its edit images.

The hooks are exercised on the toy family of ``tests/apps/test_toy_family.py`` with an adapter, defined here, whose
"edit model" reads the edit images in its prompt encoding and as reference latents."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from ds_train import DatasetError, ImageDataset, TrainingConfig, stack_conditions, train
from ds_train.cache import load_cached_sample
from tests.apps.test_toy_family import PRESET, ToyPipeline, ToyTrainingAdapter, toy_family  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _solid(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> Path:
    Image.new("RGB", size, color).save(path)
    return path


def _edit_dataset(folder: Path) -> Path:
    """Three rows: targets 16x16, edit images of other sizes (one row has two), as metadata.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, color in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        _solid(folder / f"target{index}.png", (16, 16), color)
        _solid(folder / f"edit{index}.png", (24, 16), tuple(255 - c for c in color))
        row = {"image": f"target{index}.png", "prompt": f"make it colour {index}", "edit_image": f"edit{index}.png"}
        if index == 1:  # two edit images, as a JSON list
            _solid(folder / "edit1b.png", (16, 24), (128, 128, 128))
            row["edit_image"] = ["edit1.png", "edit1b.png"]
        rows.append(row)
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


# ---------------------------------------------------------------------------------------------- the data
def test_extra_image_columns_load_per_sample(tmp_path):
    _edit_dataset(tmp_path)
    dataset = ImageDataset(tmp_path, 16, 16)
    assert dataset.extra_roles == {"edit_image"}
    assert [len(sample.extras["edit_image"]) for sample in dataset.samples] == [1, 2, 1]
    item = dataset[1]
    edits = item["extras"]["edit_image"]
    # Edit images keep their own size (the family's pipeline resizes them its own way), in [-1, 1].
    assert [tuple(e.shape) for e in edits] == [(3, 16, 24), (3, 24, 16)]
    assert all(float(e.min()) >= -1 and float(e.max()) <= 1 for e in edits)
    assert "1-2 edit_image per row" in dataset.describe()
    # A dataset without extra columns gives empty extras.
    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"image": "target0.png", "prompt": "p"}))
    assert ImageDataset(plain, 16, 16)[0]["extras"] == {}


def test_csv_numbered_edit_columns_control_image_and_mask(tmp_path):
    _solid(tmp_path / "target.png", (32, 16), (10, 20, 30))
    _solid(tmp_path / "a.png", (8, 8), (255, 0, 0))
    _solid(tmp_path / "b.png", (8, 8), (0, 255, 0))
    _solid(tmp_path / "canny.png", (64, 32), (255, 255, 255))
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (0, 0, 32, 32))  # the left half is repainted
    mask.save(tmp_path / "mask.png")
    with (tmp_path / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "prompt", "edit_image_2", "edit_image", "control_image", "inpaint_mask"])
        writer.writerow(["target.png", "two edits", "b.png", "a.png", "canny.png", "mask.png"])
        writer.writerow(["target.png", "one edit", "", "a.png", "canny.png", "mask.png"])  # edit_image_2 may be empty
    dataset = ImageDataset(tmp_path, 16, 32)
    assert dataset.extra_roles == {"edit_image", "control_image", "inpaint_mask"}
    # edit_image comes first, then edit_image_2, whatever the column order.
    assert [p.name for p in dataset.samples[0].extras["edit_image"]] == ["a.png", "b.png"]
    assert [p.name for p in dataset.samples[1].extras["edit_image"]] == ["a.png"]
    extras = dataset[0]["extras"]
    # The control image and the mask are resized and cropped like the target: pixel-aligned with it.
    assert tuple(extras["control_image"][0].shape) == (3, 16, 32)
    mask_tensor = extras["inpaint_mask"][0]
    assert tuple(mask_tensor.shape) == (1, 16, 32) and mask_tensor.min() == 0 and mask_tensor.max() == 1
    assert float(mask_tensor[0, :, :14].mean()) == 1.0 and float(mask_tensor[0, :, 18:].mean()) == 0.0
    assert float(extras["edit_image"][0][0].mean()) == 1.0  # pure red in [-1, 1]


def test_broken_extra_images_name_row_column_and_file(tmp_path):
    _solid(tmp_path / "target.png", (16, 16), (10, 20, 30))
    _solid(tmp_path / "edit.png", (16, 16), (10, 20, 30))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = [
        {"prompt": "fine", "edit_image": "edit.png", "control_image": "edit.png"},
        {"prompt": "missing edit", "edit_image": ["edit.png", "gone.png"], "control_image": "edit.png"},
        {"prompt": "broken control", "edit_image": "edit.png", "control_image": "broken.png"},
        {"prompt": "no control", "edit_image": "edit.png"},
        {"prompt": "two controls", "edit_image": "edit.png", "control_image": ["a", "b"]},
        {"prompt": "no edit", "edit_image": [], "control_image": "edit.png"},
    ]
    rows = [{"image": "target.png", **row} for row in rows]
    (tmp_path / "metadata.json").write_text(json.dumps(rows))
    with pytest.raises(DatasetError) as error:
        ImageDataset(tmp_path, 16, 16)
    message = str(error.value)
    assert "5 broken row(s)" in message
    assert "metadata.json row 2: " in message and "gone.png: edit_image: file not found" in message
    assert "metadata.json row 3: " in message and "broken.png: control_image: unreadable image" in message
    assert "metadata.json row 4: " in message and "empty 'control_image'" in message
    assert "metadata.json row 5: " in message and "'control_image' must be one file" in message
    assert "metadata.json row 6: " in message and "empty 'edit_image'" in message
    with pytest.warns(UserWarning, match="dropped 5 broken row"):
        dataset = ImageDataset(tmp_path, 16, 16, skip_broken=True)
    assert [sample.caption for sample in dataset.samples] == ["fine"]


def test_stack_conditions_pads_ragged_prompts_and_names_a_shape_mismatch():
    short = {"text": torch.ones(3, 4), "mask": torch.ones(3, dtype=torch.bool), "ref": torch.zeros(2, 2)}
    long = {"text": torch.ones(5, 4), "mask": torch.ones(5, dtype=torch.bool), "ref": torch.zeros(2, 2)}
    batch = stack_conditions([short, long], {"text", "mask"})
    assert batch["text"].shape == (2, 5, 4) and batch["text"][0, 3:].abs().sum() == 0
    assert batch["mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    with pytest.raises(ValueError, match=r"'text' of different shapes.*batch_size=1"):
        stack_conditions([short, long], {"mask"})


# ---------------------------------------------------------------------------------------------- the hooks
class EditToyAdapter(ToyTrainingAdapter):
    """A toy "edit model": its prompt encoding reads the edit images (the text gets their mean added, and one
    token per edit image, so prompts are ragged), and the first edit image becomes reference latents."""

    ragged_conditions = frozenset({"text"})

    def __init__(self, sigma_shift: float | None = None):
        super().__init__(sigma_shift)
        self.seen: list[dict[str, torch.Tensor]] = []

    def check_extras(self, pipe: Any, roles: Any) -> None:
        if set(roles) != {"edit_image"}:
            raise ValueError(f"the toy edit model needs edit_image columns, got {sorted(roles)}")

    def encode_sample_prompt(self, pipe: Any, prompt: str, extras: Mapping[str, list[torch.Tensor]]) -> dict:
        text = pipe.encode_prompt([prompt])
        edits = extras.get("edit_image", [])
        if edits:
            text = text + float(edits[0].mean())
            text = torch.cat([text, torch.zeros(1, len(edits), text.shape[-1])], dim=1)
        return {"text": text}

    def prompt_depends_on(self, extras: Mapping[str, list[torch.Tensor]]) -> bool:
        return bool(extras.get("edit_image"))

    def encode_extras(self, pipe: Any, pixels: torch.Tensor, latents: torch.Tensor, extras: Mapping) -> dict:
        edit = F.interpolate(extras["edit_image"][0][None], size=pixels.shape[-2:], mode="nearest")
        return {"reference": pipe.encode_image(edit)}

    def predict(self, model: Any, noisy: torch.Tensor, sigmas: torch.Tensor, conditions: dict) -> torch.Tensor:
        self.seen.append({k: v.detach().clone() for k, v in conditions.items()})
        return ToyPipeline.predict(model, noisy, sigmas, {"text": conditions["text"]})


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "uncached"])
def test_edit_samples_reach_the_adapter_and_dropped_captions_keep_their_images(toy_family, tmp_path, cache):  # noqa: F811
    data = _edit_dataset(tmp_path / "data")
    adapter = EditToyAdapter()
    config = TrainingConfig(
        model=PRESET,
        data=data,
        output=tmp_path / "run",
        steps=3,
        batch_size=3,
        height=16,
        width=16,
        mixed_precision="no",
        device="cpu",
        progress_bar=False,
        tensorboard=False,
        checkpoint_every=0,
        lora_rank=2,
        cache=cache,
        caption_dropout=0.5,
    )
    result = train(config, adapter=adapter)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    pipe = ToyPipeline.from_pretrained(PRESET, torch_dtype=torch.float32, device="cpu", progress_bar=False)
    prompts = [pipe.encode_prompt([f"make it colour {row}"])[0] for row in range(3)]
    empty = pipe.encode_prompt([""])[0]
    dropped = kept = 0
    for conditions in adapter.seen:
        # A batch of three: prompts padded to the longest (8 tokens + 2 edit-image tokens).
        assert conditions["text"].shape == (3, 10, 16) and conditions["reference"].shape == (3, 48, 4, 4)
        for text, reference in zip(conditions["text"], conditions["reference"], strict=True):
            # The reference latents' mean is the sample's edit image's; its prompt encoding added the same.
            own = text[:8] - float(reference.mean())
            if torch.allclose(own, empty, atol=1e-5):
                dropped += 1  # the empty prompt, encoded with this sample's own edit images
            else:
                assert any(torch.allclose(own, prompt, atol=1e-5) for prompt in prompts)
                kept += 1
    assert dropped and kept, (dropped, kept)
    if cache:
        _, _, own_empty = load_cached_sample(tmp_path / "run" / "cache" / "000001.safetensors")
        assert own_empty is not None and own_empty["text"].shape == (10, 16)
        with safe_open(tmp_path / "run" / "cache" / "000001.safetensors", "pt") as handle:
            assert "edit1b.png" in handle.metadata()["identity"]


def test_an_adapter_without_extras_refuses_a_dataset_with_them(toy_family, tmp_path):  # noqa: F811
    data = _edit_dataset(tmp_path / "data")
    config = TrainingConfig(
        model=PRESET,
        data=data,
        output=tmp_path / "run",
        steps=1,
        height=16,
        width=16,
        mixed_precision="no",
        device="cpu",
        progress_bar=False,
        tensorboard=False,
    )
    with pytest.raises(
        ValueError, match="the dataset has edit_image columns, but toy trains on a prompt and an image"
    ):
        train(config, adapter=ToyTrainingAdapter())
