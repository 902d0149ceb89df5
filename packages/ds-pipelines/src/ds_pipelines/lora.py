"""LoRA files in the formats the field uses, turned into ``(down, up)`` pairs on a model's own layers.

Key formats: peft / diffusers (``<module>.lora_A.weight``, ``lora_B``, optionally ``.default``), kohya and
ComfyUI (``<module>.lora_down.weight``, ``lora_up`` and ``<module>.alpha``; flat ``lora_unet_a_b_c`` names),
with the prefixes trainers add (``transformer.``, ``diffusion_model.``, ``base_model.model.``). Module names
either are the model's own, or a family maps them (diffusers' split q/k/v onto fused layers).

Alpha: a module's ``.alpha`` tensor; else the peft ``LoraConfig`` stored with the file, as diffusers'
``save_lora_weights`` writes it (JSON in the safetensors metadata key ``lora_adapter_metadata``, fields prefixed
``transformer.``) or as peft's ``save_pretrained`` does (``adapter_config.json`` beside ``adapter_model.*``):
``lora_alpha``, per-module ``alpha_pattern``/``rank_pattern`` and ``use_rslora``, read as peft reads them; else
alpha = rank (scale 1). Every tensor is checked for NaN and infinity, and every error names the file and the key.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ds_loader.checkpoint import load_pickle
from ds_loader.families import LoraTarget
from ds_vram import SafetensorsSource
from ds_vram.sources import all_finite

__all__ = ["ADAPTER_METADATA_KEY", "LoraPiece", "LoraState", "lora_layers", "parse_lora", "read_lora"]

_SUFFIX = re.compile(
    r"(?P<module>.+?)\.(?:(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.default)?\.weight|(?P<alpha>alpha))"
)
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
KOHYA_PREFIX = "lora_unet_"
# diffusers' save_lora_weights stores peft's LoraConfig (per model part, fields prefixed "transformer.") here.
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
LIKELY_CAUSE = "It is probably a LoRA for another model, or for another size of this model."


@dataclass
class LoraPiece:
    """One module's adapter as stored: ``down`` (rank, in, ...), ``up`` (out, rank, ...), optional alpha.

    ``down_key``/``up_key`` are the keys in the file and ``source`` the file, for error messages.
    """

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    down_key: str = ""
    up_key: str = ""
    source: str = ""

    def where(self) -> str:
        """``"<file>: LoRA key '<up key>'"`` (or without the file for a state dict built in memory)."""
        key = f"LoRA key {self.up_key or self.down_key!r}"
        return f"{self.source}: {key}" if self.source else key


class LoraState(dict):
    """A LoRA file's tensors by key (a plain dict to every caller), with the file and the adapter settings
    stored beside the tensors.

    ``path``: the file (None for tensors built in memory). ``adapter_configs``: peft ``LoraConfig`` fields
    (``r``, ``lora_alpha``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora``) by the key prefix they apply
    to: ``"transformer"`` for diffusers' ``"transformer.lora_alpha"``..., ``""`` for unprefixed metadata and for
    peft's ``adapter_config.json``. ``parse_lora`` takes the alphas from them.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor] = (),
        *,
        path: Path | None = None,
        adapter_configs: Mapping[str, Mapping[str, object]] | None = None,
    ):
        super().__init__(tensors)
        self.path = path
        self.adapter_configs = dict(adapter_configs or {})


_Whole = LoraTarget  # a target covering a whole layer


def read_lora(path: str | os.PathLike) -> LoraState:
    """Tensors of a LoRA file: safetensors (mapped), or a pickle only through ``ds_loader``'s ``load_pickle``
    (``weights_only=True``; a refused file names itself and how to get a safetensors one), with the adapter
    settings stored beside them (see ``LoraState``). A NaN or infinite value is an error naming file and key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        source = SafetensorsSource(path)  # checks each tensor for NaN and infinity as it is read
        tensors = {key: source.get(key) for key in list(source.keys())}
        return LoraState(tensors, path=path, adapter_configs=_adapter_configs(path, source.metadata))
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        state = load_pickle(path, what="LoRA file")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{path}: not a LoRA state dict (expected a mapping of names to tensors)")
        for key, tensor in state.items():
            if not all_finite(tensor):
                raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values; the LoRA file is broken")
        return LoraState(state, path=path, adapter_configs=_adapter_configs(path, {}))
    raise ValueError(f"{path}: unsupported LoRA file type {path.suffix!r}; use .safetensors (or .pt/.bin/.ckpt)")


def _adapter_configs(path: Path, metadata: Mapping[str, str]) -> dict[str, dict[str, object]]:
    """The peft LoraConfig fields stored with a LoRA file, by key prefix (see ``LoraState``)."""
    configs: dict[str, dict[str, object]] = {}
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if raw:
        try:
            fields = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: metadata {ADAPTER_METADATA_KEY!r} is not valid JSON ({error})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: metadata {ADAPTER_METADATA_KEY!r} is not a JSON object")
        for name, value in fields.items():
            prefix, _, field = str(name).rpartition(".")
            configs.setdefault(prefix, {})[field] = value
    peft_config = path.with_name("adapter_config.json")
    if not configs and path.stem == "adapter_model" and peft_config.is_file():  # peft's save_pretrained folder
        try:
            fields = json.loads(peft_config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{peft_config}: not valid JSON ({error})") from None
        if isinstance(fields, dict) and fields.get("peft_type", "LORA") == "LORA":
            configs[""] = fields
    return configs


def parse_lora(
    state: Mapping[str, torch.Tensor], adapter_configs: Mapping[str, Mapping[str, object]] | None = None
) -> tuple[dict[str, LoraPiece], list[str]]:
    """Group a LoRA state dict by module name (trainer prefixes removed); also returns unrecognised keys.

    A module without an ``.alpha`` tensor takes its alpha from ``adapter_configs`` (default: those ``read_lora``
    found with the file, see ``LoraState``) as peft computes it, so the scale ``alpha / rank`` is diffusers'.
    """
    if adapter_configs is None:
        adapter_configs = getattr(state, "adapter_configs", {})
    path = getattr(state, "path", None)
    source = str(path) if path is not None else ""
    pieces: dict[str, LoraPiece] = {}
    stored: dict[str, str] = {}  # module -> its name in the file, prefixes included
    unknown = []
    for key, tensor in state.items():
        match = _SUFFIX.fullmatch(key)
        if match is None:
            unknown.append(key)
            continue
        module = match["module"]
        for prefix in _PREFIXES:
            module = module.removeprefix(prefix)
        stored.setdefault(module, match["module"])
        piece = pieces.setdefault(module, LoraPiece(source=source))
        if match["alpha"]:
            piece.alpha = float(tensor.float().item())
        elif match["kind"] in ("lora_A", "lora_down"):
            piece.down, piece.down_key = tensor, key
        else:
            piece.up, piece.up_key = tensor, key
    incomplete = [name for name, piece in pieces.items() if piece.down is None or piece.up is None]
    for name in incomplete:
        unknown.append(name)
        del pieces[name]
    for module, piece in pieces.items():
        _check_piece(piece)
        if piece.alpha is None and adapter_configs:
            piece.alpha = _configured_alpha(stored[module], piece, adapter_configs)
    return pieces, unknown


def _check_piece(piece: LoraPiece) -> None:
    rank = piece.down.shape[0]
    if piece.up.dim() < 2 or piece.up.shape[1] != rank or any(s != 1 for s in piece.up.shape[2:]):
        raise ValueError(
            f"{piece.where()} has shape {tuple(piece.up.shape)}, but its down matrix {piece.down_key!r} has rank "
            f"{rank} (shape {tuple(piece.down.shape)}): the file is broken"
        )
    if piece.alpha is not None and not math.isfinite(piece.alpha):
        raise ValueError(f"{piece.where()}: its alpha is {piece.alpha}; the LoRA file is broken")


def _configured_alpha(module: str, piece: LoraPiece, configs: Mapping[str, Mapping[str, object]]) -> float | None:
    """The alpha peft would give ``module`` (its name in the file) from a stored LoraConfig, expressed for our
    ``alpha / rank`` scale (rsLoRA's ``alpha / sqrt(rank)`` included); None when no config covers it."""
    for prefix in sorted(configs, key=len, reverse=True):
        if prefix and not module.startswith(prefix + "."):
            continue
        config = configs[prefix]
        if "lora_alpha" not in config:
            return None
        name = module[len(prefix) + 1 :] if prefix else module
        name = name.removeprefix("base_model.model.")
        rank = piece.down.shape[0]
        configured_rank = _pattern_value(config.get("rank_pattern"), name, config.get("r", rank), piece)
        alpha = _pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"], piece)
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            raise ValueError(f"{piece.where()}: the file's adapter metadata gives lora_alpha {alpha!r}, not a number")
        if configured_rank != rank:
            raise ValueError(
                f"{piece.where()}: the file's adapter metadata gives rank {configured_rank!r}, but the tensors have "
                f"rank {rank}: the file is broken"
            )
        return float(alpha) * (math.sqrt(rank) if config.get("use_rslora") else 1.0)
    return None


def _pattern_value(pattern: object, name: str, default: object, piece: LoraPiece) -> object:
    """peft's per-module override: the first key of ``pattern`` that matches the end of ``name`` at a dot."""
    if not pattern:
        return default
    if not isinstance(pattern, dict):
        raise ValueError(f"{piece.where()}: the file's adapter metadata has a pattern {pattern!r}, not an object")
    for key, value in pattern.items():
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error as error:
            where = piece.where()
            raise ValueError(f"{where}: adapter metadata pattern {key!r} is not a valid regex ({error})") from None
    return default


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
    stacked = {layer: _stack(layer, model.get_submodule(layer), items) for layer, items in groups.items()}
    return stacked, unmatched


def _stack(
    layer_name: str, layer: nn.Module, items: list[tuple[object, LoraPiece]]
) -> tuple[torch.Tensor, torch.Tensor]:
    out_features, in_features = layer.weight.shape[:2]
    total_rank = sum(piece.down.shape[0] for _, piece in items)
    kernel_ones = [1] * (layer.weight.dim() - 2)
    up = torch.zeros(out_features, total_rank, *kernel_ones)
    downs, offset = [], 0
    for target, piece in items:
        rank = piece.down.shape[0]
        if tuple(piece.down.shape[1:]) != tuple(layer.weight.shape[1:]):
            raise _misfit(
                layer_name,
                layer,
                piece,
                f"its down matrix {piece.down_key!r} has shape {tuple(piece.down.shape)}, where the layer takes "
                f"{in_features} inputs",
            )
        scale = 1.0 if piece.alpha is None else piece.alpha / rank
        downs.append(piece.down.float() * scale)
        piece_up = piece.up.float().reshape(piece.up.shape[0], rank, *kernel_ones)
        if target.swap_halves:
            first, second = piece_up.chunk(2, dim=0)
            piece_up = torch.cat([second, first])
        if target.part is None:
            rows, part = slice(0, out_features), "the layer"
        else:
            sizes = target.part_sizes(out_features, in_features)
            start = sum(sizes[: target.part])
            rows = slice(start, start + sizes[target.part])
            part = f"its part {target.part} (rows {rows.start}:{rows.stop})"
        if piece_up.shape[0] != rows.stop - rows.start:
            what = f"its up matrix has {piece_up.shape[0]} rows, where {part} has {rows.stop - rows.start} outputs"
            raise _misfit(layer_name, layer, piece, what)
        up[rows, offset : offset + rank] = piece_up
        offset += rank
    return torch.cat(downs), up


def _misfit(layer_name: str, layer: nn.Module, piece: LoraPiece, what: str) -> ValueError:
    shape = tuple(layer.weight.shape)
    return ValueError(
        f"{piece.where()} does not fit our layer {layer_name!r} ({type(layer).__name__}, weight {shape}): {what}. "
        f"{LIKELY_CAUSE}"
    )
