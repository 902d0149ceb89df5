"""``load_model``: from a config, a file or a folder to a ready model.

Detect the model, build it on the meta device (no memory, no initialisation), check every tensor name and shape
against the checkpoint, then bind the weights: eagerly, one tensor at a time in the target dtype (a mapped
file's tensors become parameters without a copy when the dtype already matches), or lazily through ds-vram.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch
from torch import nn

import ds_vram
from ds_loader.checkpoint import Checkpoint
from ds_loader.config import ModelConfig
from ds_loader.detect import CheckpointLike, Match, as_checkpoints, detect, registry, run_spec
from ds_loader.download import HubClient
from ds_loader.errors import (
    AmbiguousModelError,
    CheckpointError,
    DetectionError,
    LoaderError,
    RecipeError,
    StateDictMismatchError,
)
from ds_loader.spec import Detection, ModelSpec
from ds_vram import WeightSource
from ds_vram.sources import all_finite

__all__ = ["load_model", "open_weights", "validate_weights"]

logger = logging.getLogger(__name__)

SHOWN = 5  # keys listed per category in a mismatch error


def _checkpoints(config_or_paths: ModelConfig | CheckpointLike, hub: HubClient | None) -> list[Checkpoint]:
    if isinstance(config_or_paths, ModelConfig):
        return as_checkpoints(config_or_paths.resolve(hub=hub))
    return as_checkpoints(config_or_paths)


def _select(checkpoints: list[Checkpoint], spec: ModelSpec | str | None) -> Match:
    if spec is None:
        matches = detect(checkpoints)
    else:
        spec = registry.get(spec) if isinstance(spec, str) else spec
        matches, reasons = [], []
        for checkpoint in checkpoints:
            result = run_spec(spec, checkpoint)
            if isinstance(result, Detection):
                matches.append(Match(spec, result.format, result.config, checkpoint))
            else:
                where = f" [{checkpoint.component}]" if checkpoint.component else ""
                reasons.append(f"{checkpoint.name}{where}: {result.reason}")
        if not matches:
            raise DetectionError(f"spec {spec.name!r} does not recognise the checkpoint: " + "; ".join(reasons))
    if len(matches) > 1:
        described = ", ".join(m.describe() for m in matches)
        raise AmbiguousModelError(
            f"{checkpoints[0].name}: several models match: {described}; pass spec= (a ModelSpec or its name)"
            " or the component folder to load"
        )
    return matches[0]


def open_weights(match: Match) -> WeightSource:
    """The checkpoint in the model's own key names: the checkpoint itself, or a lazy conversion of it."""
    recipe = match.spec.recipe(match.format)
    return match.checkpoint if recipe is None else recipe.apply(match.checkpoint)


def _listing(title: str, items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    more = f", ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"\n  {title} ({len(items)}): {shown}{more}"


def validate_weights(model: nn.Module, weights: WeightSource, match: Match) -> None:
    """Raise one ``StateDictMismatchError`` listing missing, unexpected and mis-shaped keys (and unbuildable
    converted tensors), naming the file, the spec and the format."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    available = set(weights.keys())
    missing = [k for k in expected if k not in available]
    unexpected = sorted(available - expected.keys())
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    broken: list[str] = []
    for key in expected:
        if key not in available:
            continue
        try:
            shape = weights.info(key).shape
        except (KeyError, RecipeError) as error:
            message = error.args[0] if error.args else repr(error)
            broken.append(f"{key} ({message})")
            continue
        if shape != expected[key]:
            mismatched.append((key, shape, expected[key]))
    if not (missing or unexpected or mismatched or broken):
        return
    counts = [f"{len(missing)} missing", f"{len(unexpected)} unexpected", f"{len(mismatched)} mis-shaped"]
    if broken:
        counts.append(f"{len(broken)} not computable")
    message = (
        f"{match.checkpoint.name} does not fit model spec {match.spec.name!r} (format {match.format!r}, "
        f"config {match.config}): {', '.join(counts)} key(s)"
    )
    if missing:
        message += _listing("missing", missing)
    if unexpected:
        message += _listing("unexpected", unexpected)
    if mismatched:
        message += _listing("mis-shaped (file vs model)", [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched])
    if broken:
        message += _listing("not computable", broken)
    raise StateDictMismatchError(message, missing, unexpected, mismatched, broken)


def _target_dtype(tensor: torch.Tensor, torch_dtype: torch.dtype | None) -> torch.dtype:
    # Only floating-point tensors follow torch_dtype; integer and bool buffers (indices, masks) keep theirs.
    if torch_dtype is None or not tensor.is_floating_point():
        return tensor.dtype
    return torch_dtype


def _convert(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type != "cpu":
        # Cast on the device: the host never holds a second copy, and the GPU casts faster.
        return tensor.to(device, non_blocking=False).to(dtype)
    return tensor.to(dtype)


def bind_weights(
    model: nn.Module,
    weights: WeightSource,
    device: torch.device,
    torch_dtype: torch.dtype | None,
    source_name: str = "the checkpoint",
) -> None:
    """Replace every meta parameter and buffer with the checkpoint's tensor, one at a time.

    This is what ``load_state_dict(assign=True)`` does, without first gathering a full state dict: peak extra
    memory is one converted tensor, and same-dtype CPU tensors stay views of the mapped file. The sources
    check each stored tensor for NaN and infinity when it is first read; a tensor cast to a narrower dtype
    is checked again here, since values beyond float16's range become infinite.
    """
    for name, current in model.state_dict(keep_vars=True).items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        stored = weights.get(name)
        tensor = _convert(stored, device, _target_dtype(stored, torch_dtype))
        if tensor.dtype != stored.dtype and not all_finite(tensor):
            largest = stored.detach().abs().max().item()
            raise CheckpointError(
                f"{source_name}: tensor {name!r} does not fit {tensor.dtype}: its values (up to {largest:.4g}) "
                f"overflow to infinity when cast from {stored.dtype}; load it in a wider dtype (torch.bfloat16 "
                "or torch.float32)"
            )
        if leaf in owner._parameters:
            requires_grad = current.requires_grad and tensor.is_floating_point()
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)
        else:
            owner._buffers[leaf] = tensor


def _on_meta(model: nn.Module) -> list[str]:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named if tensor.is_meta]


def _enable_vram(model: nn.Module, vram: ds_vram.VRAMConfig, weights: WeightSource, spec: ModelSpec) -> None:
    if not isinstance(vram, ds_vram.VRAMConfig):
        raise TypeError(f"vram must be a ds_vram.VRAMConfig, got {type(vram).__name__}")
    vram = dataclasses.replace(
        vram,
        never_fp8=tuple(vram.never_fp8) + tuple(spec.never_fp8),
        units=tuple(vram.units) + tuple(spec.vram_units),
    )
    ds_vram.enable_vram_management(model, vram, weights=weights)


def load_model(
    config_or_paths: ModelConfig | CheckpointLike,
    device: str | torch.device = "cpu",
    torch_dtype: torch.dtype | None = None,
    vram: ds_vram.VRAMConfig | None = None,
    spec: ModelSpec | str | None = None,
    hub: HubClient | None = None,
) -> nn.Module:
    """Load one model from a ``ModelConfig``, file(s), a folder or opened checkpoints.

    device, torch_dtype: where and in what dtype floating-point weights are placed (None: as stored); integer
        and bool tensors keep their dtype.
    vram: a ``ds_vram.VRAMConfig``; ds-vram then places the weights and ``device`` is not used. With
        ``storage="disk"`` the model stays on the meta device and ds-vram reads each (converted) tensor when
        its layer runs; otherwise weights are bound on the CPU first. The handle is ``ds_vram.get_vram_handle(model)``.
    spec: the ``ModelSpec`` (or its name) to use when detection is ambiguous or to skip the other specs.
    hub: replaces the download client for a ``ModelConfig`` (mirrors, tests).

    Returns the model in eval mode. Raises ``DetectionError``/``AmbiguousModelError`` when the checkpoint
    is not (uniquely) recognised and ``StateDictMismatchError`` when its tensors do not fit the model.
    """
    checkpoints = _checkpoints(config_or_paths, hub)
    match = _select(checkpoints, spec)
    weights = open_weights(match)
    with torch.device("meta"):
        model = match.spec.create(match.config)
    validate_weights(model, weights, match)
    if vram is not None and getattr(vram, "storage", None) == "disk":
        _enable_vram(model, vram, weights, match.spec)
        return model.eval()
    device = torch.device("cpu") if vram is not None else torch.device(device)
    bind_weights(model, weights, device, torch_dtype, match.checkpoint.name)
    leftovers = _on_meta(model)
    if leftovers:
        raise LoaderError(
            f"spec {match.spec.name!r}: {', '.join(leftovers[:SHOWN])} stayed on the meta device; tensors outside "
            "the state dict (non-persistent buffers) must be computed in forward or registered as persistent"
        )
    if vram is not None:
        _enable_vram(model, vram, weights, match.spec)
    logger.info("loaded %s from %s (format %s)", match.spec.name, match.checkpoint.name, match.format)
    return model.eval()
