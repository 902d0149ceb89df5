"""``diffsynth generate --inpaint-mask`` on the tiny Qwen-Image repository: the pipeline's ``inpaint_mask`` with
``--input-image`` (what changes between seeds lies in the masked part), the ControlNet input's mask with
``--control-type inpaint`` and a blockwise Inpaint ControlNet, and the usage errors (a missing file, a file that is not
an image, a mask with nowhere to go, a pipeline without a mask option, a ControlNet without a mask input)."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import ds_pipelines.qwen_image as qwen_image
from ds_models_qwen_image.controlnet import QwenImageBlockwiseControlNet, QwenImageBlockwiseControlNetConfig
from tests.apps.test_cli import run_main
from tests.apps.test_cli_qwen_image import QUIET, picture, recorded
from tests.pipelines.qwen_image_fixtures import qwen_image_files, randomize  # noqa: F401  (session fixture)

SIZE = ["--height", "64", "--width", "64"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


def left_half_mask(path):
    """White (repaint) on the left 32 columns of a 64x64 image."""
    array = np.zeros((64, 64), dtype=np.uint8)
    array[:, :32] = 255
    Image.fromarray(array).save(path)
    return path


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float64)


def controlnet_file(path, config: QwenImageBlockwiseControlNetConfig, seed: int):
    controlnet = randomize(QwenImageBlockwiseControlNet(config), seed)
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, path)
    return path


def local_decode(self, latents, *args, **kwargs):
    """Latent pixel i, j to the 8x8 pixels above it: three latent channels, squashed to [-1, 1]. The tiny VAE's
    decoder mixes the whole picture (its mid-block attention), which would hide where the latents changed."""
    return F.interpolate(latents[:, :3].float().tanh(), scale_factor=8, mode="nearest")


def test_inpaint_mask_repaints_only_the_masked_part(qwen_image_files, capsys, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(qwen_image.QwenImagePipeline, "decode", local_decode)
    source = picture(tmp_path / "source.png", 4, 64, 64)
    mask = left_half_mask(tmp_path / "mask.png")
    model = ["generate", "--model", qwen_image_files.repo, "--prompt", "a red door", *SIZE, *QUIET]
    outputs = []
    for seed in (0, 1):
        output = tmp_path / f"inpainted-{seed}.png"
        code, out, err = run_main(
            capsys, *model, "--input-image", source, "--inpaint-mask", mask, "--seed", seed, "-o", output
        )
        assert code == 0, err
        assert out.strip() == str(output)
        assert recorded(output)["inpaint"] is True
        outputs.append(pixels(output))
    change = np.abs(outputs[0] - outputs[1]).mean(axis=(0, 2))  # per column
    masked, kept = change[:32].mean(), change[32:].mean()
    assert masked > 5.0, change
    assert masked > 20 * kept, (masked, kept)  # outside the mask the latents lead back to the input's

    # Without the mask the whole picture changes with the seed.
    plain = []
    for seed in (0, 1):
        output = tmp_path / f"plain-{seed}.png"
        code, _, err = run_main(capsys, *model, "--input-image", source, "--seed", seed, "-o", output)
        assert code == 0, err
        plain.append(pixels(output))
    assert np.abs(plain[0] - plain[1]).mean(axis=(0, 2))[32:].mean() > masked / 5


def test_inpaint_mask_goes_to_an_inpainting_controlnet(qwen_image_files, capsys, tmp_path):  # noqa: F811
    inpaint = controlnet_file(
        tmp_path / "inpaint.safetensors", QwenImageBlockwiseControlNetConfig.preset("tiny-inpaint"), 7
    )
    source = picture(tmp_path / "source.png", 4, 64, 64)
    left = left_half_mask(tmp_path / "left.png")
    right = tmp_path / "right.png"
    Image.fromarray(255 - np.asarray(Image.open(left))).save(right)
    model = ["generate", "--model", qwen_image_files.repo, "--prompt", "a red door", *SIZE, *QUIET]
    control = ["--controlnet", inpaint, "--control-image", source, "--control-type", "inpaint"]
    results = []
    for mask in (left, right):
        output = tmp_path / f"controlled-{mask.stem}.png"
        code, _, err = run_main(capsys, *model, *control, "--inpaint-mask", mask, "-o", output)
        assert code == 0, err
        result = recorded(output)
        assert result["controlnet"] == [{"type": "inpaint", "scale": 1.0, "start": 0.0, "end": 1.0}]
        assert result.get("inpaint") is None  # the mask went to the ControlNet only
        results.append(pixels(output))
    assert np.abs(results[0] - results[1]).mean() > 0.5  # the mask reaches the ControlNet

    # With --input-image as well, the pipeline inpaints with the same mask.
    output = tmp_path / "both.png"
    code, _, err = run_main(capsys, *model, *control, "--inpaint-mask", left, "--input-image", source, "-o", output)
    assert code == 0, err
    assert recorded(output)["inpaint"] is True and recorded(output)["controlnet"][0]["type"] == "inpaint"

    # A ControlNet without a mask input (the blockwise Canny) refuses it, by the pipeline's message.
    canny = controlnet_file(tmp_path / "canny.safetensors", QwenImageBlockwiseControlNetConfig.tiny(), 5)
    code, _, err = run_main(
        capsys, *model, "--controlnet", canny, "--control-image", source, "--control-type", "inpaint",
        "--inpaint-mask", left, "-o", tmp_path / "refused.png",
    )  # fmt: skip
    assert code == 1 and "the loaded ControlNet has no mask input" in err
    assert not (tmp_path / "refused.png").exists()


def test_inpaint_mask_usage_errors(qwen_image_files, capsys, tmp_path):  # noqa: F811
    source = picture(tmp_path / "source.png", 4, 64, 64)
    mask = left_half_mask(tmp_path / "mask.png")
    model = ["generate", "--model", qwen_image_files.repo, "--prompt", "x", *SIZE, *QUIET]

    missing = tmp_path / "no-mask.png"
    code, _, err = run_main(capsys, *model, "--input-image", source, "--inpaint-mask", missing)
    assert code == 1 and f"--inpaint-mask {missing}: no such file" in err

    text = tmp_path / "mask-notes.png"
    text.write_text("white = repaint\n")
    code, _, err = run_main(capsys, *model, "--input-image", source, "--inpaint-mask", text)
    assert code == 2 and f"--inpaint-mask {text}: not an image" in err

    truncated = tmp_path / "half-mask.png"
    truncated.write_bytes(mask.read_bytes()[:80])
    code, _, err = run_main(capsys, *model, "--input-image", source, "--inpaint-mask", truncated)
    assert code == 2 and f"--inpaint-mask {truncated}: not an image" in err

    code, _, err = run_main(capsys, *model, "--inpaint-mask", mask)
    assert code == 2 and "--inpaint-mask needs --input-image" in err

    code, _, err = run_main(capsys, *model, "--control-image", source, "--control-type", "inpaint")
    assert code == 2 and "--control-type inpaint needs --inpaint-mask" in err

    # The demo model's pipeline (FLUX.1) has no inpaint_mask option: refused before anything loads.
    demo = ["generate", "--prompt", "a digit", *QUIET, "--input-image", source, "--inpaint-mask", mask]
    code, _, err = run_main(capsys, *demo)
    assert code == 2 and "takes no inpaint mask" in err
