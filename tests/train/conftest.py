"""The tiny FLUX.1 repository the pipeline tests build, and a tiny captioned image dataset."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw

from tests.pipelines.conftest import flux_files  # noqa: F401  (a session fixture, re-exported)

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
