"""The tiny FLUX.1 repository the pipeline tests build, a tiny captioned image dataset, and one of video clips."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from tests.pipelines.conftest import flux_files  # noqa: F401  (a session fixture, re-exported)
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401  (a session fixture, re-exported)

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def write_dataset(folder, size: int = 32, shapes: tuple[str, ...] = ("square", "circle")) -> list[str]:
    """Images of a coloured shape on grey with captions "a red square": learnable, and tiny."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for color, rgb in COLORS.items():
        for shape in shapes:
            image = Image.new("RGB", (size, size), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
            (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=rgb)
            name = f"{color}_{shape}"
            image.save(folder / f"{name}.png")
            caption = f"a {color} {shape}"
            (folder / f"{name}.txt").write_text(caption)
            captions.append(caption)
    return captions


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    write_dataset(folder)
    return folder


def moving_square(color: tuple[int, int, int], frames: int, size: int = 32) -> list[Image.Image]:
    """A square moving 3 pixels right per frame on grey."""
    clip = []
    for index in range(frames):
        image = Image.new("RGB", (size, size), (128, 128, 128))
        left = 2 + 3 * index
        ImageDraw.Draw(image).rectangle((left, 10, left + 10, 20), fill=color)
        clip.append(image)
    return clip


def write_clips(folder):
    """Three 7-frame mp4 clips of a moving square (red, green, blue), a 3-frame clip and a still image, captioned."""
    from ds_pipelines.media import save_video

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("red", "green", "blue"):
        save_video(moving_square(COLORS[name], 7), folder / f"{name}.mp4", fps=16, progress_bar=False)
        (folder / f"{name}.txt").write_text(f"a {name} square moving right")
    save_video(moving_square(COLORS["red"], 3), folder / "short.mp4", fps=16, progress_bar=False)
    (folder / "short.txt").write_text("a red square, briefly")
    moving_square(COLORS["green"], 1)[0].save(folder / "still.png")
    (folder / "still.txt").write_text("a green square")
    return folder
