"""ds_train with Qwen-Image's blockwise Inpaint ControlNet (68 values a token: 64 of the blacked-out picture's latents
and 4 of the kept mask): a metadata table with image, control_image and inpaint_mask columns trains the ControlNet
and leaves the DiT as released, the cache holds what the pipeline encodes for the same picture and mask, and a table
without the inpaint_mask column is refused before anything trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from ds_models_qwen_image.controlnet import QwenImageBlockwiseControlNet, QwenImageBlockwiseControlNetConfig
from ds_train import TrainingConfig, train
from ds_train.cache import load_cached_sample
from ds_train.qwen_image import QwenImageTrainingAdapter
from tests.pipelines.qwen_image_fixtures import qwen_image_files  # noqa: F401  (session fixture)
from tests.train.test_qwen_image_training import BASE, SIZE, _shape


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def inpaint_data(tmp_path_factory):
    """Targets (a coloured square), the picture to repaint (the same square on a noisy background) and a mask over
    the square, in metadata.csv; and the same table without the inpaint_mask column, in a second folder."""
    folder = tmp_path_factory.mktemp("qwen-inpaint")
    lines = ["image,control_image,inpaint_mask,prompt"]
    rng = np.random.default_rng(0)
    for index, (name, color) in enumerate((("red", (220, 30, 30)), ("blue", (40, 60, 220)))):
        _shape(folder / f"{name}.png", color)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / f"{name}_picture.png")
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).rectangle((8 + 4 * index, 8, 24, 24 - 4 * index), fill=255)
        mask.save(folder / f"{name}_mask.png")
        lines.append(f"{name}.png,{name}_picture.png,{name}_mask.png,a {name} square")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")

    unmasked = tmp_path_factory.mktemp("qwen-inpaint-no-mask")
    rows = ["image,control_image,prompt"]
    for name in ("red", "blue"):
        for suffix in ("", "_picture"):
            (unmasked / f"{name}{suffix}.png").write_bytes((folder / f"{name}{suffix}.png").read_bytes())
        rows.append(f"{name}.png,{name}_picture.png,a {name} square")
    (unmasked / "metadata.csv").write_text("\n".join(rows) + "\n")
    return folder, unmasked


@pytest.fixture(scope="module")
def inpaint_controlnet_file(tmp_path_factory):
    torch.manual_seed(6)
    config = QwenImageBlockwiseControlNetConfig.preset("tiny-inpaint")
    controlnet = QwenImageBlockwiseControlNet(config)
    assert config.conditioning_dim == 68
    with torch.no_grad():  # random, not zero-initialised: its residuals reach the output from the first step
        for parameter in controlnet.parameters():
            parameter.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("qwen-inpaint-controlnet") / "model.safetensors"
    save_file(controlnet.state_dict(), str(path))
    return path


def _run(repo, data, output, **overrides) -> TrainingConfig:
    return TrainingConfig(
        **{
            **BASE,
            "model": repo,
            "data": data,
            "output": output,
            "mode": "full",
            "trainable": ("controlnet",),
            "steps": 2,
            "learning_rate": 1e-2,
            "cache": True,
            **overrides,
        }
    )


def test_inpaint_controlnet_training_changes_only_the_controlnet(
    qwen_image_files,  # noqa: F811
    inpaint_data,
    inpaint_controlnet_file,
    tmp_path,
):
    data, _ = inpaint_data
    adapter = QwenImageTrainingAdapter(controlnet=str(inpaint_controlnet_file), train_controlnet=True)
    run = _run(
        qwen_image_files.repo,
        data,
        tmp_path / "inpaint",
        sample_prompts=("a red square",),
        sample_at=(2,),
        sample_inference_steps=1,
    )
    result = train(run, adapter=adapter)
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    # The sample runs the pipeline with the first row's picture and mask through the trained ControlNet.
    assert len(list((tmp_path / "inpaint" / "samples").glob("step-000002-0.*"))) == 1
    assert result.weights_path.name == "controlnet.safetensors"
    before, after = load_file(str(inpaint_controlnet_file)), load_file(str(result.weights_path))
    assert set(before) == set(after)
    assert after["img_in.weight"].shape[1] == 68  # the mask's 4 values a token are still read
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert "img_in.weight" in changed and any(key.startswith("controlnet_blocks.1.") for key in changed)
    # The mask columns of img_in learn too: the mask reaches the ControlNet in training.
    assert not torch.equal(before["img_in.weight"][:, 64:], after["img_in.weight"][:, 64:])
    # The DiT the run used is the released one, untouched.
    original = load_file(str(next((qwen_image_files.repo / "transformer").glob("*.safetensors"))))
    dit = adapter.pipe.dit.state_dict()
    assert all(torch.equal(dit[key].float(), value.float()) for key, value in original.items())

    # The cache holds the 68-value tokens the pipeline encodes for an inpaint ControlNetInput of that picture and
    # mask: the picture blacked out under the mask, then the kept part of the mask.
    from ds_pipelines import ControlNetInput

    for index, name in enumerate(("red", "blue")):
        conditions, _, _ = load_cached_sample(tmp_path / "inpaint" / "cache" / f"{index:06d}.safetensors")
        with Image.open(data / f"{name}_picture.png") as picture, Image.open(data / f"{name}_mask.png") as mask:
            control = ControlNetInput(picture.convert("RGB"), inpaint_mask=mask.convert("L"), control_type="inpaint")
            expected = adapter.pipe.encode_control(control, SIZE, SIZE)
        assert conditions["control"].shape == (SIZE // 16 * SIZE // 16, 68)
        torch.testing.assert_close(conditions["control"], expected[0], rtol=1e-4, atol=1e-4)
        mask_tokens = conditions["control"][:, 64:]
        assert mask_tokens.min() == 0 and mask_tokens.max() == 1  # 1 - mask: both kept and repainted pixels


def test_inpaint_mask_without_a_control_image_repaints_the_target(
    qwen_image_files,  # noqa: F811
    inpaint_data,
    inpaint_controlnet_file,
    tmp_path,
):
    """Without a control_image column the picture to repaint is the target itself (ds_train.qwen_image)."""
    data, _ = inpaint_data
    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("red", "blue"):
        for suffix in ("", "_mask"):
            (folder / f"{name}{suffix}.png").write_bytes((data / f"{name}{suffix}.png").read_bytes())
    (folder / "metadata.csv").write_text(
        "image,inpaint_mask,prompt\nred.png,red_mask.png,a red square\nblue.png,blue_mask.png,a blue square\n"
    )
    adapter = QwenImageTrainingAdapter(controlnet=str(inpaint_controlnet_file), train_controlnet=True)
    result = train(_run(qwen_image_files.repo, folder, tmp_path / "run", steps=1), adapter=adapter)
    assert all(np.isfinite(result.losses))
    from ds_pipelines import ControlNetInput

    conditions, _, _ = load_cached_sample(tmp_path / "run" / "cache" / "000000.safetensors")
    with Image.open(folder / "red.png") as target, Image.open(folder / "red_mask.png") as mask:
        control = ControlNetInput(target.convert("RGB"), inpaint_mask=mask.convert("L"), control_type="inpaint")
        expected = adapter.pipe.encode_control(control, SIZE, SIZE)
    torch.testing.assert_close(conditions["control"], expected[0], rtol=1e-4, atol=1e-4)


def test_inpaint_controlnet_without_a_mask_column_is_refused(
    qwen_image_files,  # noqa: F811
    inpaint_data,
    inpaint_controlnet_file,
    tmp_path,
):
    _, unmasked = inpaint_data
    adapter = QwenImageTrainingAdapter(controlnet=str(inpaint_controlnet_file), train_controlnet=True)
    with pytest.raises(ValueError, match="takes 17 latent channels, so the dataset needs an inpaint_mask column"):
        train(_run(qwen_image_files.repo, unmasked, tmp_path / "refused"), adapter=adapter)
    assert not (tmp_path / "refused" / "controlnet.safetensors").exists()


def test_controlnet_training_refuses_several_processes(monkeypatch):
    """DDP never sees the ControlNet's forward (it runs inside the DiT's blocks), so it would not average its
    gradients: a multi-process ControlNet run is refused before it starts instead of drifting apart."""

    class Pipe:
        def __init__(self):
            self._components = {"controlnet": object()}

    adapter = QwenImageTrainingAdapter(controlnet="unused.safetensors", train_controlnet=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="train_controlnet runs in one process; this run has 2"):
        adapter.check(Pipe(), 64, 64, None)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 1)
    adapter.check(Pipe(), 64, 64, None)
