"""Tiny blockwise Qwen-Image ControlNets (Canny-shaped and Inpaint-shaped) saved as DiffSynth-Studio releases them
(``model.safetensors``), for the tiny Qwen-Image repository's DiT (2 blocks of width 64)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file


def write_tiny_blockwise(path: Path, inpaint: bool = False, seed: int = 5) -> Path:
    """Random weights (not zero-initialised, so the ControlNet changes the image); ``inpaint`` adds the mask's
    4 input values per token."""
    from ds_models_qwen_image.controlnet import QwenImageBlockwiseControlNet, QwenImageBlockwiseControlNetConfig

    config = QwenImageBlockwiseControlNetConfig.preset("tiny-inpaint" if inpaint else "tiny")
    torch.manual_seed(seed)
    controlnet = QwenImageBlockwiseControlNet(config)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.normal_(0, 0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(controlnet.state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def qwen_image_controlnets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("qwen_image_controlnets")
    return SimpleNamespace(
        canny=write_tiny_blockwise(root / "Canny" / "model.safetensors"),
        inpaint=write_tiny_blockwise(root / "Inpaint" / "model.safetensors", inpaint=True),
    )
