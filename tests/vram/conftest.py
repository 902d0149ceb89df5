"""Fixtures: a tiny module with every kind of managed layer, and its weights as a safetensors file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.vram.tiny_models import TinyNet, save_module


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def tiny_file(tiny_net: TinyNet, tmp_path: Path) -> Path:
    return save_module(tiny_net, tmp_path / "tiny.safetensors")
