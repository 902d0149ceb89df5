"""ds_notebook without a browser or kernel: grids, inline video, and the PipelineUI callback logic."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from PIL import Image

from ds_notebook import PipelineUI, show_images, show_video
from ds_pipelines import FluxImagePipeline
from ds_pipelines.media import VideoFrames


def picture(color: str, seed: int | None = None, size=(32, 24)) -> Image.Image:
    image = Image.new("RGB", size, color)
    if seed is not None:
        image.info["diffsynth"] = json.dumps({"prompt": "a dot", "seed": seed})
    return image


def test_show_images_grid_html_and_captions(tmp_path):
    images = [picture("red", 0), picture("green", 1), picture("blue", 2)]
    grid = show_images(images, columns=2, cell_size=40)
    assert grid.captions == ["a dot, seed 0", "a dot, seed 1", "a dot, seed 2"]  # from the pipeline's metadata
    composed = grid.image
    assert composed.size == (80, 2 * (40 + 18))
    assert composed.getpixel((20, 10)) == (255, 0, 0) and composed.getpixel((60, 10)) == (0, 128, 0)
    assert composed.getpixel((60, 58 + 10)) == (255, 255, 255)  # the empty fourth cell
    html = grid._repr_html_()
    assert html.count("<img ") == 3 and "grid-template-columns:repeat(2" in html and "seed 2" in html
    escaped = show_images([picture("red")], captions=["<b>x</b>"])
    assert "&lt;b&gt;x&lt;/b&gt;" in escaped.html and escaped.image.size == (256, 256 + 18)
    path = tmp_path / "one.png"
    picture("blue").save(path)
    assert show_images(path).captions == [""] and show_images(path).image.size == (256, 256)
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        show_images(images, captions=["a", "b"])
    with pytest.raises(ValueError, match="at least one image"):
        show_images([])


def test_show_video_mp4_gif_and_files(tmp_path):
    frames = VideoFrames([picture(c, size=(32, 32)) for c in ("red", "green", "blue")], fps=8)
    player = show_video(frames)
    assert player.mime == "video/mp4" and player.data[4:8] == b"ftyp"
    assert "<video" in player.html and base64.b64encode(player.data).decode()[:40] in player.html
    gif = show_video(frames, fps=10, format="gif")  # GIF delays are in hundredths of a second
    assert gif.data[:6] == b"GIF89a" and "image/gif" in gif.html
    with Image.open(gif.save(tmp_path / "a.gif")) as opened:
        assert opened.n_frames == 3 and opened.info["duration"] == 100
    odd = show_video([picture("red", size=(33, 31))] * 2, fps=4)  # H.264 needs even sizes: falls back to GIF
    assert odd.mime == "image/gif"
    mp4 = player.save(tmp_path / "a.mp4")
    assert show_video(mp4).data == player.data
    with pytest.raises(FileNotFoundError, match="no such file"):
        show_video(tmp_path / "none.mp4")
    with pytest.raises(ValueError, match="format='webm'"):
        show_video(frames, format="webm")


class FakePipeline:
    """Records calls; an image pipeline whose result carries parameters like ours."""

    def __init__(self):
        self.calls, self.loras = [], []

    def __call__(self, prompt, *, seed=None, num_inference_steps=30, height=1024, width=1024, negative_prompt=""):
        self.calls.append(dict(prompt=prompt, seed=seed, steps=num_inference_steps, size=(width, height)))
        image = picture("red", seed, size=(width, height))
        image.info["diffsynth"] = json.dumps({"prompt": prompt, "seed": seed, "steps": num_inference_steps})
        return image

    def load_lora(self, path, scale=1.0):
        self.loras.append((path.name, scale))

    def clear_lora(self):
        self.loras.clear()


def test_pipeline_ui_logic_without_a_browser(tmp_path):
    pipe = FakePipeline()
    ui = PipelineUI(pipe, loras=[tmp_path / "ink.safetensors"], defaults={"height": 32, "width": 48})
    with pytest.raises(ValueError, match="write a prompt"):
        ui.generate()
    ui.prompt.value, ui.seed.value, ui.steps.value, ui.lora_scale.value = "a cat", 7, 3, 0.5
    ui.generate()
    assert pipe.calls == [dict(prompt="a cat", seed=7, steps=3, size=(48, 32))]
    assert pipe.loras == [("ink.safetensors", 0.5)]
    assert bytes(ui.image.value).startswith(b"\x89PNG") and ui.result.size == (48, 32)
    assert ui.parameters["seed"] == 7 and ui.parameters["loras"] == [{"file": "ink.safetensors", "scale": 0.5}]
    assert "<b>seed</b></td><td>7" in ui.info.value
    ui.button.click()  # the button runs the same logic; the LoRA is not re-applied at the same scale
    assert len(pipe.calls) == 2 and pipe.loras == [("ink.safetensors", 0.5)] and not ui.button.disabled
    ui.lora_scale.value = 1.5
    ui.generate()
    assert pipe.loras == [("ink.safetensors", 1.5)]
    ui.prompt.value = ""
    ui.button.click()  # errors land in the UI instead of raising
    assert "write a prompt first" in ui.info.value
    assert "application/vnd.jupyter.widget-view+json" in ui._repr_mimebundle_()


def test_pipeline_ui_on_a_real_tiny_flux_pipeline_and_video_results(flux_files):
    pipe = FluxImagePipeline.from_pretrained(
        flux_files.bfl_repo, device="cpu", torch_dtype=torch.float32, progress_bar=False
    )
    ui = PipelineUI(pipe, defaults={"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 1})
    ui.seed.value = 3
    image = ui.generate()
    assert image.size == (32, 32) and ui.parameters["seed"] == 3 and ui.parameters["steps"] == 1
    expected = pipe("a cat", seed=3, height=32, width=32, num_inference_steps=1)
    assert image.tobytes() == expected.tobytes()

    class VideoPipeline:
        def __call__(self, prompt, *, seed=None, height=32, width=32):
            frames = [picture("red", size=(width, height))] * 3
            return VideoFrames(frames, fps=16, parameters={"prompt": prompt, "seed": seed})

    video_ui = PipelineUI(VideoPipeline(), defaults={"prompt": "waves", "height": 32, "width": 32})
    video_ui.generate()
    assert "<video" in video_ui.video.value and bytes(video_ui.image.value) == b"" and video_ui.parameters["seed"] == 0
