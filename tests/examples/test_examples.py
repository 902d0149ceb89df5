"""Each script in examples/ runs top to bottom against tiny local models, with tiny sizes and few steps.

Each script runs from its own source file as ``__main__`` with its own ``sys.argv`` (``runpy``), top to bottom,
imports included, exactly as ``python examples/<family>/<script>.py ...`` runs it; but in this process, because a
fresh interpreter costs 15-20 s of imports on a 2-core machine, which the examples together cannot afford.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FLUX_TINY = ["--height", "64", "--width", "64", "--steps", "2", "--device", "cpu"]
WAN_TINY = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "2", "--device", "cpu"]
Z_IMAGE_TINY = ["--height", "64", "--width", "64", "--steps", "2", "--device", "cpu"]
QWEN_TINY = ["--height", "32", "--width", "32", "--steps", "2", "--device", "cpu"]


def run_example(script: str, *args: object, monkeypatch: pytest.MonkeyPatch) -> dict:
    path = EXAMPLES / script
    monkeypatch.setattr(sys, "argv", [str(path), *map(str, args)])
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")  # a script that reached for a preset fails, not downloads
    return runpy.run_path(str(path), run_name="__main__")


def video_frame_count(path: Path) -> int:
    import imageio_ffmpeg

    frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    return frames


def test_flux_inference(flux_files, tmp_path, monkeypatch):
    output = tmp_path / "flux.png"
    run_example(
        "flux/inference.py", "--model", flux_files.bfl_repo, "--output", output, *FLUX_TINY, monkeypatch=monkeypatch
    )
    with Image.open(output) as image:
        assert image.size == (64, 64)
        assert json.loads(image.info["diffsynth"])["steps"] == 2


def test_flux_low_vram_inference_streams_from_disk(flux_files, tmp_path, monkeypatch, capsys):
    output = tmp_path / "low.png"
    namespace = run_example(
        "flux/low_vram_inference.py",
        "--model",
        flux_files.bfl_repo,
        "--output",
        output,
        "--vram-limit",
        "0",
        "--storage",
        "disk",
        *FLUX_TINY,
        monkeypatch=monkeypatch,
    )
    report = namespace["report"]
    assert report.resident_bytes < report.streamed_bytes  # vram_limit 0: the DiT's layers stream
    assert {layer.storage for layer in report.layers} >= {"disk"}
    assert output.is_file() and "GiB streamed" in capsys.readouterr().out


@pytest.fixture
def dataset(tmp_path):
    """Four 32x32 images with captions: the layout examples/flux/*_training.py document."""
    folder = tmp_path / "data"
    folder.mkdir()
    for index, color in enumerate(("red", "green", "blue", "white")):
        Image.new("RGB", (32, 32), color).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a {color} square")
    return folder


def test_flux_lora_training(flux_files, dataset, tmp_path, monkeypatch):
    from ds_pipelines import inspect_lora

    output = tmp_path / "run"
    run_example(
        "flux/lora_training.py",
        "--model",
        flux_files.bfl_repo,
        "--data",
        dataset,
        "--output",
        output,
        "--trigger",
        "sks",
        "--steps",
        "2",
        "--rank",
        "4",
        "--size",
        "32",
        "--mixed-precision",
        "no",
        "--device",
        "cpu",
        monkeypatch=monkeypatch,
    )
    info = inspect_lora(output / "lora.safetensors")
    assert info.format == "comfyui" and set(info.ranks) == {4}
    assert info.metadata["ss_network_dim"] == "4"
    with Image.open(output / "sample.png") as image:
        assert image.size == (32, 32)


def test_flux_full_training(flux_files, dataset, tmp_path, monkeypatch):
    output = tmp_path / "run"
    namespace = run_example(
        "flux/full_training.py",
        "--model",
        flux_files.bfl_repo,
        "--data",
        dataset,
        "--output",
        output,
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--size",
        "32",
        "--mixed-precision",
        "no",
        "--device",
        "cpu",
        monkeypatch=monkeypatch,
    )
    assert namespace["result"].weights_path == output / "dit.safetensors"
    assert namespace["result"].steps == 2
    with Image.open(output / "sample.png") as image:
        assert image.size == (32, 32)


def test_wan_text_to_video(wan_files, tmp_path, monkeypatch):
    output = tmp_path / "t2v.mp4"
    run_example(
        "wan/text_to_video.py", "--model", wan_files.t2v, "--output", output, *WAN_TINY, monkeypatch=monkeypatch
    )
    assert video_frame_count(output) == 5


def test_wan_image_to_video(wan_files, tmp_path, monkeypatch):
    image, output = tmp_path / "first.png", tmp_path / "i2v.mp4"
    Image.linear_gradient("L").resize((48, 40)).convert("RGB").save(image)
    run_example(
        "wan/image_to_video.py",
        "--model",
        wan_files.i2v,
        "--image",
        image,
        "--output",
        output,
        *WAN_TINY,
        monkeypatch=monkeypatch,
    )
    assert video_frame_count(output) == 5


def test_wan_low_vram_inference(wan_files, tmp_path, monkeypatch):
    output = tmp_path / "low.mp4"
    namespace = run_example(
        "wan/low_vram_inference.py",
        "--model",
        wan_files.t2v,
        "--output",
        output,
        "--vram-limit",
        "0",
        "--storage",
        "cpu",
        *WAN_TINY,
        monkeypatch=monkeypatch,
    )
    from ds_vram import get_vram_handle

    report = get_vram_handle(namespace["pipe"].dit).report()
    assert report.storage == "cpu" and report.streamed_bytes > 0
    assert video_frame_count(output) == 5


WAN_TRAIN_TINY = ["--height", "32", "--width", "32", "--frames", "5", "--mixed-precision", "no", "--device", "cpu"]


@pytest.mark.parametrize(
    ("script", "extra", "weights"),
    [("wan/lora_training.py", ["--rank", "4"], "lora.safetensors"), ("wan/full_training.py", [], "dit.safetensors")],
)
def test_wan_training(script, extra, weights, wan_files, tmp_path, monkeypatch):
    from ds_pipelines.lora_info import inspect_lora
    from tests.train.conftest import write_clips

    output, data = tmp_path / "run", write_clips(tmp_path / "clips")
    arguments = ["--model", wan_files.t2v, "--data", data, "--output", output, "--steps", "2", *extra]
    namespace = run_example(script, *arguments, *WAN_TRAIN_TINY, monkeypatch=monkeypatch)
    assert namespace["result"].steps == 2 and namespace["result"].weights_path == output / weights
    if weights == "lora.safetensors":
        info = inspect_lora(output / weights)
        assert info.format == "comfyui" and set(info.ranks) == {4}
    assert video_frame_count(output / "sample.mp4") == 5


def test_z_image_inference(z_image_files, tmp_path, monkeypatch):
    output = tmp_path / "z_image.png"
    arguments = ["--model", z_image_files.repo, "--output", output, "--cfg-scale", "2", "--negative-prompt", "blurry"]
    run_example("z_image/inference.py", *arguments, *Z_IMAGE_TINY, monkeypatch=monkeypatch)
    with Image.open(output) as image:
        assert image.size == (64, 64)
        parameters = json.loads(image.info["diffsynth"])
    assert parameters["steps"] == 2 and parameters["cfg_scale"] == 2.0


def test_z_image_low_vram_inference_streams_the_dit(z_image_files, tmp_path, monkeypatch, capsys):
    output = tmp_path / "low.png"
    arguments = ["--model", z_image_files.repo, "--output", output, "--vram-limit", "0", "--storage", "disk"]
    namespace = run_example("z_image/low_vram_inference.py", *arguments, *Z_IMAGE_TINY, monkeypatch=monkeypatch)
    report = namespace["report"]
    assert report.resident_bytes < report.streamed_bytes  # vram_limit 0: the DiT's layers stream
    assert {layer.storage for layer in report.layers} >= {"disk"}
    assert output.is_file() and "GiB streamed" in capsys.readouterr().out


def test_z_image_lora_training(z_image_files, dataset, tmp_path, monkeypatch):
    from ds_pipelines import inspect_lora

    output = tmp_path / "run"
    arguments = ["--model", z_image_files.repo, "--data", dataset, "--output", output, "--trigger", "sks"]
    arguments += ["--steps", "2", "--rank", "4", "--size", "32", "--mixed-precision", "no", "--device", "cpu"]
    namespace = run_example("z_image/lora_training.py", *arguments, monkeypatch=monkeypatch)
    assert namespace["result"].steps == 2
    info = inspect_lora(output / "lora.safetensors")
    assert info.format == "comfyui" and set(info.ranks) == {4}
    with Image.open(output / "sample.png") as image:
        assert image.size == (32, 32)


def test_z_image_controlnet(z_image_files, z_image_controlnet_file, tmp_path, monkeypatch):
    pose, output = tmp_path / "pose.png", tmp_path / "controlled.png"
    Image.linear_gradient("L").resize((80, 48)).convert("RGB").save(pose)  # any size: resized to the output's
    arguments = ["--model", z_image_files.repo, "--controlnet", z_image_controlnet_file, "--output", output]
    arguments += ["--control-image", pose, "--control-type", "Pose", "--control-scale", "0.8", "--control-end", "0.5"]
    run_example("z_image/controlnet.py", *arguments, *Z_IMAGE_TINY, monkeypatch=monkeypatch)
    with Image.open(output) as image:
        assert image.size == (64, 64)
        parameters = json.loads(image.info["diffsynth"])
    assert parameters["controlnet"] == [{"type": "pose", "scale": 0.8, "start": 0.0, "end": 0.5}]


def test_z_image_controlnet_inpaint(z_image_files, z_image_controlnet_file, tmp_path, monkeypatch):
    picture, mask, output = tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "inpainted.png"
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(picture)
    white_left = Image.new("L", (64, 64), 0)
    white_left.paste(255, (0, 0, 32, 64))  # repaint the left half
    white_left.save(mask)
    arguments = ["--model", z_image_files.repo, "--controlnet", z_image_controlnet_file, "--output", output]
    arguments += ["--control-image", picture, "--control-type", "inpaint", "--inpaint-mask", mask]
    namespace = run_example("z_image/controlnet.py", *arguments, *Z_IMAGE_TINY, monkeypatch=monkeypatch)
    assert namespace["control"].inpaint_mask is not None
    with Image.open(output) as image:
        assert image.size == (64, 64)
        assert json.loads(image.info["diffsynth"])["controlnet"][0]["type"] == "inpaint"


def test_qwen_image_inference(qwen_image_files, tmp_path, monkeypatch):
    output = tmp_path / "qwen.png"
    arguments = [
        "--model",
        qwen_image_files.repo,
        "--output",
        output,
        "--cfg-scale",
        "2",
        "--negative-prompt",
        "blurry",
    ]
    run_example("qwen_image/inference.py", *arguments, *QWEN_TINY, monkeypatch=monkeypatch)
    with Image.open(output) as image:
        assert image.size == (32, 32)
        parameters = json.loads(image.info["diffsynth"])
    assert parameters["steps"] == 2 and parameters["cfg_scale"] == 2.0


def test_qwen_image_edit_with_two_images(qwen_image_files, tmp_path, monkeypatch):
    first, second, output = tmp_path / "person.png", tmp_path / "dress.png", tmp_path / "edited.png"
    Image.linear_gradient("L").resize((48, 32)).convert("RGB").save(first)
    Image.radial_gradient("L").resize((32, 32)).convert("RGB").save(second)
    arguments = ["--model", qwen_image_files.edit_repo, "--edit-image", first, "--edit-image", second]
    arguments += ["--output", output, "--cfg-scale", "1"]
    run_example("qwen_image/edit.py", *arguments, *QWEN_TINY, monkeypatch=monkeypatch)
    with Image.open(output) as image:
        assert image.size == (32, 32)
        assert json.loads(image.info["diffsynth"])["edit_images"] == 2


def test_qwen_image_controlnet(qwen_image_files, qwen_image_controlnets, tmp_path, monkeypatch):
    edges, output = tmp_path / "edges.png", tmp_path / "controlled.png"
    Image.radial_gradient("L").resize((40, 24)).convert("RGB").save(edges)  # any size: resized to the output's
    arguments = ["--model", qwen_image_files.repo, "--controlnet", qwen_image_controlnets.canny, "--output", output]
    arguments += ["--control-image", edges, "--control-scale", "0.8", "--control-end", "0.5"]
    run_example("qwen_image/controlnet.py", *arguments, *QWEN_TINY, monkeypatch=monkeypatch)
    with Image.open(output) as image:
        assert image.size == (32, 32)
        controls = json.loads(image.info["diffsynth"])["controlnet"]
    assert controls == [{"type": None, "scale": 0.8, "start": 0.0, "end": 0.5}]


def test_qwen_image_controlnet_inpaint(qwen_image_files, qwen_image_controlnets, tmp_path, monkeypatch):
    picture, mask, output = tmp_path / "photo.png", tmp_path / "mask.png", tmp_path / "inpainted.png"
    Image.linear_gradient("L").resize((32, 32)).convert("RGB").save(picture)
    white_left = Image.new("L", (32, 32), 0)
    white_left.paste(255, (0, 0, 16, 32))  # repaint the left half
    white_left.save(mask)
    arguments = ["--model", qwen_image_files.repo, "--controlnet", qwen_image_controlnets.inpaint]
    arguments += ["--output", output, "--control-image", picture, "--inpaint-mask", mask]
    namespace = run_example("qwen_image/controlnet.py", *arguments, *QWEN_TINY, monkeypatch=monkeypatch)
    assert namespace["control"].inpaint_mask is not None
    with Image.open(output) as image:
        assert json.loads(image.info["diffsynth"])["controlnet"][0]["type"] == "inpaint"


def test_qwen_image_low_vram_inference_streams_the_dit(qwen_image_files, tmp_path, monkeypatch, capsys):
    output = tmp_path / "low.png"
    arguments = ["--model", qwen_image_files.repo, "--output", output, "--vram-limit", "0", "--storage", "disk"]
    namespace = run_example("qwen_image/low_vram_inference.py", *arguments, *QWEN_TINY, monkeypatch=monkeypatch)
    report = namespace["report"]
    assert report.resident_bytes < report.streamed_bytes  # vram_limit 0: the DiT's layers stream
    assert {layer.storage for layer in report.layers} >= {"disk"}
    assert output.is_file() and "GiB streamed" in capsys.readouterr().out


def test_qwen_image_lora_training(qwen_image_files, dataset, tmp_path, monkeypatch):
    from ds_pipelines import inspect_lora

    output = tmp_path / "run"
    arguments = ["--model", qwen_image_files.repo, "--data", dataset, "--output", output, "--trigger", "sks"]
    arguments += ["--steps", "2", "--rank", "4", "--size", "32", "--mixed-precision", "no", "--device", "cpu"]
    namespace = run_example("qwen_image/lora_training.py", *arguments, monkeypatch=monkeypatch)
    assert namespace["result"].steps == 2
    info = inspect_lora(output / "lora.safetensors")
    assert info.format == "comfyui" and set(info.ranks) == {4}
    with Image.open(output / "sample.png") as image:
        assert image.size == (32, 32)
