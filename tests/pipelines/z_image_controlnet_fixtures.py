"""A tiny Z-Image-Turbo-Fun-Controlnet-Union 2.1 file for the tiny Z-Image repository, shared by the examples' and the
docs' tests; built as tests/pipelines/test_z_image_controlnet.py builds its own (diffusers' ``ZImageControlNetModel``
at the tiny DiT's width, random weights with enough scale to move the image)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import save_file

from tests.pipelines.test_z_image_controlnet import FILES, _diffusers_controlnet
from tests.pipelines.z_image_fixtures import randomize_dit


def write_tiny_controlnet(folder: Path, version: str = "2.1", seed: int = 70) -> Path:
    """Save a tiny Union ``version`` ("2.1" or "1.0") under its released file name in ``folder``; returns the path."""
    model = randomize_dit(_diffusers_controlnet(version), seed)
    path = folder / FILES[version]
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def z_image_controlnet_file(tmp_path_factory) -> Path:
    """The tiny Union 2.1 (33 input channels: control latents, inpaint mask, masked-picture latents)."""
    return write_tiny_controlnet(tmp_path_factory.mktemp("z_image_controlnet_file"))
