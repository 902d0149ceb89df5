"""LoRA files in the formats the field uses, turned into ``(down, up)`` pairs on a model's own layers.

Key formats: peft / diffusers (``<module>.lora_A.weight``, ``lora_B``, optionally ``.default``), kohya and
ComfyUI (``<module>.lora_down.weight``, ``lora_up`` and ``<module>.alpha``; flat ``lora_unet_a_b_c`` names),
with the prefixes trainers add (``transformer.``, ``diffusion_model.``, ``base_model.model.``). Module names
either are the model's own, or a family maps them (diffusers' split q/k/v onto fused layers).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ds_vram import SafetensorsSource

__all__ = ["LoraPiece", "lora_layers", "parse_lora", "read_lora"]

_SUFFIX = re.compile(
    r"(?P<module>.+?)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight|(?P<alpha>alpha))"
)
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
KOHYA_PREFIX = "lora_unet_"


@dataclass
class LoraPiece:
    """One module's adapter as stored: ``down`` (rank, in, ...), ``up`` (out, rank, ...), optional alpha."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None


@dataclass(frozen=True)
class _Whole:
    layer: str
    part: int | None = None
    part_sizes: Callable[[int, int], list[int]] | None = None
    swap_halves: bool = False


def read_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a LoRA file: safetensors (lazily mapped), or a pickle only through ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        source = SafetensorsSource(path)
        keys = list(source.keys())
        return {key: source.get(key) for key in keys}
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: not a LoRA state dict (expected a mapping of names to tensors)")
        return state
    raise ValueError(f"{path}: unsupported LoRA file type {path.suffix!r}; use .safetensors (or .pt/.bin/.ckpt)")


def parse_lora(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, LoraPiece], list[str]]:
    """Group a LoRA state dict by module name (trainer prefixes removed); also returns unrecognised keys."""
    pieces: dict[str, LoraPiece] = {}
    unknown = []
    for key, tensor in state.items():
        match = _SUFFIX.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        module = match["module"]
        for prefix in _PREFIXES:
            module = module.removeprefix(prefix)
        piece = pieces.setdefault(module, LoraPiece())
        if match["alpha"]:
            piece.alpha = float(tensor.float().item())
        elif match["kind"] in ("lora_A", "lora_down"):
            piece.down = tensor
        else:
            piece.up = tensor
    incomplete = [name for name, piece in pieces.items() if piece.down is None or piece.up is None]
    for name in incomplete:
        unknown.append(name)
        del pieces[name]
    return pieces, unknown


def _target(module: str, names: dict[str, str], family: Callable[[str], object] | None) -> object | None:
    if module in names.values():
        return _Whole(module)
    if module.startswith(KOHYA_PREFIX) and module[len(KOHYA_PREFIX) :] in names:
        return _Whole(names[module[len(KOHYA_PREFIX) :]])
    return family(module) if family is not None else None


def lora_layers(
    pieces: Mapping[str, LoraPiece], model: nn.Module, family_targets: Callable[[str], object] | None = None
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """``{layer: (down, up)}`` on ``model``'s Linear/Conv layers, alpha/rank folded into ``down``.

    Pieces that land on parts of one fused layer are stacked: downs concatenated along the rank, each up
    placed in its rows and its rank columns, so ``up @ down`` is exactly the sum of the parts' products.
    Returns the layers and the module names that matched nothing.
    """
    names = {
        name.replace(".", "_"): name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    }
    groups: dict[str, list[tuple[object, LoraPiece]]] = {}
    unmatched = []
    for module, piece in pieces.items():
        target = _target(module, names, family_targets)
        if target is None or target.layer not in names.values():
            unmatched.append(module)
            continue
        groups.setdefault(target.layer, []).append((target, piece))
    return {layer: _stack(model.get_submodule(layer), items) for layer, items in groups.items()}, unmatched


def _stack(layer: nn.Module, items: list[tuple[object, LoraPiece]]) -> tuple[torch.Tensor, torch.Tensor]:
    out_features, in_features = layer.weight.shape[:2]
    total_rank = sum(piece.down.shape[0] for _, piece in items)
    kernel_ones = [1] * (layer.weight.dim() - 2)
    up = torch.zeros(out_features, total_rank, *kernel_ones)
    downs, offset = [], 0
    for target, piece in items:
        rank = piece.down.shape[0]
        scale = 1.0 if piece.alpha is None else piece.alpha / rank
        downs.append(piece.down.float() * scale)
        piece_up = piece.up.float().reshape(piece.up.shape[0], rank, *kernel_ones)
        if target.swap_halves:
            first, second = piece_up.chunk(2, dim=0)
            piece_up = torch.cat([second, first])
        if target.part is None:
            rows = slice(0, out_features)
        else:
            sizes = target.part_sizes(out_features, in_features)
            start = sum(sizes[: target.part])
            rows = slice(start, start + sizes[target.part])
        if piece_up.shape[0] != rows.stop - rows.start:
            raise ValueError(
                f"LoRA up matrix with {piece_up.shape[0]} rows does not fit rows {rows.start}:"
                f"{rows.stop} of layer {type(layer).__name__}{tuple(layer.weight.shape)}"
            )
        up[rows, offset : offset + rank] = piece_up
        offset += rank
    return torch.cat(downs), up
