"""``diffsynth generate`` on the tiny Qwen-Image repositories: ``--edit-image`` (repeatable) on an Edit folder, the
output size taken from the last edit image, ``--controlnet``/``--control-image`` with a blockwise ControlNet, and the
usage errors. In-process (``ds_cli.main.main``), so the edit images' release sizes (about 1 MP for the VAE) can be
lowered for the tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

import ds_pipelines.qwen_image as qwen_image
from ds_models_qwen_image.controlnet import QwenImageBlockwiseControlNet, QwenImageBlockwiseControlNetConfig
from tests.apps.test_cli import run_main
from tests.pipelines.qwen_image_fixtures import qwen_image_files, randomize  # noqa: F401  (session fixture)

QUIET = ["--steps", "1", "--device", "cpu", "--dtype", "fp32", "--quiet"]


@pytest.fixture(autouse=True)
def tiny_edit_sizes(monkeypatch, one_thread):
    monkeypatch.setattr(qwen_image, "EDIT_VAE_AREA", 64 * 64)
    monkeypatch.setattr(qwen_image, "EDIT_VL_AREA", 64 * 64)
    monkeypatch.setattr(qwen_image, "OUTPUT_AREA", 96 * 64)


def picture(path, seed: int, width: int, height: int):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


def recorded(path) -> dict:
    with Image.open(path) as image:
        return {**json.loads(image.info["diffsynth"]), "pixels": image.size}


def test_generate_edits_from_two_images(qwen_image_files, capsys, tmp_path):  # noqa: F811
    first, second = picture(tmp_path / "a.png", 1, 64, 64), picture(tmp_path / "b.png", 2, 90, 60)
    output = tmp_path / "edited.png"
    model = ["generate", "--model", qwen_image_files.edit_repo, "--prompt", "the cat of Picture 1 on Picture 2"]
    code, out, err = run_main(capsys, *model, "--edit-image", first, "--edit-image", second, "-o", output, *QUIET)
    assert code == 0, err
    assert out.strip() == str(output)
    result = recorded(output)
    assert result["pixels"] == (96, 64)  # the last edit image's 3:2 aspect (at OUTPUT_AREA)
    assert result["edit_images"] == 2 and result["prompt"] == "the cat of Picture 1 on Picture 2"

    sized = tmp_path / "sized.png"
    code, _, err = run_main(
        capsys, *model, "--edit-image", first, "-o", sized, "--height", "48", "--width", "64", *QUIET
    )
    assert code == 0, err
    assert recorded(sized)["pixels"] == (64, 48) and recorded(sized)["edit_images"] == 1


def test_generate_with_a_blockwise_controlnet(qwen_image_files, capsys, tmp_path):  # noqa: F811
    controlnet = randomize(QwenImageBlockwiseControlNet(QwenImageBlockwiseControlNetConfig.tiny()), 5)
    path = tmp_path / "canny.safetensors"
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, path)
    edges = picture(tmp_path / "edges.png", 3, 64, 64)
    output = tmp_path / "controlled.png"
    options = ["--height", "64", "--width", "64", "-o", output, *QUIET]
    model = ["generate", "--model", qwen_image_files.repo, "--prompt", "a lighthouse"]
    code, _, err = run_main(
        capsys, *model, "--controlnet", path, "--control-image", edges, "--control-scale", "0.7", *options
    )
    assert code == 0, err
    assert recorded(output)["controlnet"] == [{"type": None, "scale": 0.7, "start": 0.0, "end": 1.0}]


def test_edit_image_usage_errors(qwen_image_files, capsys, tmp_path):  # noqa: F811
    missing = tmp_path / "nothing.png"
    code, _, err = run_main(
        capsys, "generate", "--model", qwen_image_files.edit_repo, "--prompt", "x", "--edit-image", missing, *QUIET
    )
    assert code == 1 and f"--edit-image {missing}: no such file" in err
    image = picture(tmp_path / "a.png", 1, 64, 64)
    code, _, err = run_main(capsys, "generate", "--prompt", "a digit", "--edit-image", image, *QUIET)  # demo model
    assert code == 2 and "--edit-image is not an option of" in err
    code, _, err = run_main(
        capsys, "generate", "--model", qwen_image_files.repo, "--prompt", "x", "--edit-image", image, *QUIET
    )
    assert code == 1 and "edit_image needs Qwen2.5-VL's processor" in err  # a text-to-image folder
