"""Small modules that exercise every kind of layer ds-vram manages."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class Gain(nn.Module):
    """A module ds-vram has never seen: a direct parameter used in custom code."""

    def __init__(self, width: int):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class ConvStem(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.norm = nn.GroupNorm(4, width)
        self.conv1d = nn.Conv1d(width, width, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        hidden = self.norm(self.conv(image))  # (batch, width, h, w)
        tokens = hidden.flatten(2)  # (batch, width, h*w)
        return self.conv1d(tokens).transpose(1, 2)


class TinyNet(nn.Module):
    """Embedding, Linear, Conv1d/2d, LayerNorm, GroupNorm, RMSNorm, a custom parameter and a buffer."""

    def __init__(self, width: int = 32, depth: int = 3, vocabulary: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.stem = ConvStem(width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"norm": nn.LayerNorm(width), "up": nn.Linear(width, 2 * width), "down": nn.Linear(2 * width, width)}
            )
            for _ in range(depth)
        )
        self.gain = Gain(width)
        self.final_norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, 16, bias=False)
        self.register_buffer("offset", torch.randn(width))

    def forward(self, indices: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(indices) + self.stem(image)
        hidden = hidden + self.offset.to(hidden.dtype)
        for block in self.blocks:
            hidden = hidden + block["down"](torch.nn.functional.gelu(block["up"](block["norm"](hidden))))
        return self.head(self.final_norm(self.gain(hidden)))


def tiny_inputs(
    batch: int = 2, side: int = 4, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    indices = torch.randint(0, 50, (batch, side * side), generator=generator)
    image = torch.randn(batch, 3, side, side, generator=generator).to(dtype)
    return indices, image


def save_module(module: nn.Module, path: Path) -> Path:
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def clone_of(module: nn.Module) -> nn.Module:
    """A fresh copy with the same weights, since management changes a module in place."""
    copy = type(module)()
    copy.load_state_dict(module.state_dict())
    return copy.eval()
