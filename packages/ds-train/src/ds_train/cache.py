"""Encode prompts and images once, into one safetensors file per sample, and train from those files.

A cached sample holds the family's conditions (FLUX.1: ``text``, ``pooled``; Wan: ``context``, and for image-to-video
models the first frame's ``condition`` and ``clip_feature``) and ``latents``, without the batch dimension;
``empty.safetensors`` holds the empty prompt's conditions (caption dropout replaces only those). A sample whose prompt
encoding reads its extra images (an edit model's instruction seen with its edit images) also stores its own empty
prompt's conditions, as ``empty.<key>``, and dropout uses those. Each file records the caption, extra image files,
image size and model it was made from, so a changed dataset or model re-encodes instead of reusing stale files.
Uncached training encodes sample by sample in the same way, so both give the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ds_pipelines import save_safetensors_atomic

from .data import ExtraImages, ImageDataset
from .family import TrainingAdapter

__all__ = [
    "EncodedSample",
    "build_cache",
    "encode_sample",
    "encode_sample_empty_prompt",
    "load_cached",
    "load_cached_sample",
    "stack_conditions",
]

EncodedSample = tuple[dict[str, torch.Tensor], torch.Tensor]  # conditions, latents (no batch dimension)


@torch.no_grad()
def encode_sample(
    adapter: TrainingAdapter,
    pipe: Any,
    pixels: torch.Tensor | None,
    prompt: str,
    extras: ExtraImages | None = None,
) -> EncodedSample:
    """One sample's conditions and latents (``pixels`` (3, H, W) in [-1, 1]; None encodes the prompt only, with
    the sample's ``extras`` when its prompt encoding reads them)."""
    extras = extras or {}
    prompted = adapter.encode_sample_prompt(pipe, prompt, extras)
    conditions = {k: v[0].detach() for k, v in prompted.items()}
    if pixels is None:
        return conditions, torch.zeros(0)
    latents = adapter.encode_images(pipe, pixels[None]).detach()[0]
    for key, value in adapter.encode_pixel_conditions(pipe, pixels[None], latents[None]).items():
        conditions[key] = value[0].detach()
    if extras:
        for key, value in adapter.encode_extras(pipe, pixels[None], latents[None], extras).items():
            conditions[key] = value[0].detach()
    return conditions, latents


def encode_sample_empty_prompt(
    adapter: TrainingAdapter, pipe: Any, extras: ExtraImages | None
) -> dict[str, torch.Tensor] | None:
    """The empty prompt's conditions for this sample when its prompt encoding reads its extra images (caption
    dropout of an edit model keeps the edit images); None when the dataset-wide empty prompt applies."""
    if not extras or not adapter.prompt_depends_on(extras):
        return None
    return encode_sample(adapter, pipe, None, "", extras)[0]


def stack_conditions(items: list[Mapping[str, torch.Tensor]], ragged: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Samples' conditions as one batch. Keys in ``ragged`` (prompt tokens whose count differs between samples) are
    padded along their first dimension to the longest with zeros (False for masks); any other key must agree in
    shape, else a ``ValueError`` names it (a batch of edit images of different sizes needs ``batch_size=1``)."""
    stacked = {}
    for key in items[0]:
        values = [item[key] for item in items]
        shapes = {tuple(value.shape) for value in values}
        if len(shapes) > 1 and key in ragged:
            longest = max(value.shape[0] for value in values)
            values = [_pad_first(value, longest) for value in values]
        elif len(shapes) > 1:
            raise ValueError(
                f"the samples of a batch have conditions {key!r} of different shapes {sorted(shapes)}; "
                "train with batch_size=1, or give every sample extra images of one size"
            )
        stacked[key] = torch.stack(values)
    return stacked


def _pad_first(value: torch.Tensor, length: int) -> torch.Tensor:
    padding = value.new_zeros((length - value.shape[0], *value.shape[1:]))
    return torch.cat([value, padding])


def _identity(dataset: ImageDataset, index: int, model: str) -> str:
    sample = dataset.samples[index]
    width, height, frames = dataset.shape_of(index)
    identity = {
        "image": str(sample.image),
        "caption": sample.caption,
        "size": [width, height],
        "frames": frames,
        "frame_stride": dataset.frame_stride,
        "model": model,
    }
    if sample.extras:  # only then, so the caches of datasets without extra images stay valid
        identity["extras"] = {role: [str(path) for path in paths] for role, paths in sample.extras.items()}
    return json.dumps(identity)


def build_cache(
    adapter: TrainingAdapter, pipe: Any, dataset: ImageDataset, folder: Path, model: str, rank: int = 0, world: int = 1
) -> int:
    """Encode the samples of this process's share (index % world == rank) that have no valid file; returns how many."""
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for index in range(rank, len(dataset.samples), world):
        path = folder / f"{index:06d}.safetensors"
        identity = _identity(dataset, index, model)
        if path.is_file() and _metadata(path).get("identity") == identity:
            continue
        item = dataset[index]
        extras = item.get("extras", {})
        conditions, latents = encode_sample(adapter, pipe, item["pixels"], item["prompt"], extras)
        tensors = {f"cond.{k}": v.cpu() for k, v in conditions.items()} | {"latents": latents.cpu()}
        empty = encode_sample_empty_prompt(adapter, pipe, extras)
        tensors |= {f"empty.{k}": v.cpu() for k, v in (empty or {}).items()}
        save_safetensors_atomic(tensors, path, metadata={"identity": identity})
        written += 1
    empty = folder / "empty.safetensors"
    if rank == 0 and (not empty.is_file() or _metadata(empty).get("model") != model):
        conditions, _ = encode_sample(adapter, pipe, None, "")
        tensors = {f"cond.{k}": v.cpu() for k, v in conditions.items()}
        save_safetensors_atomic(tensors, empty, metadata={"model": model})
    return written


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def load_cached(path: Path) -> EncodedSample:
    """A cached sample's conditions and latents (or ``empty.safetensors``'s conditions and an empty tensor)."""
    conditions, latents, _ = load_cached_sample(path)
    return conditions, latents


def load_cached_sample(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor] | None]:
    """A cached sample's conditions, latents and own empty-prompt conditions (None: the dataset-wide ones apply)."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    conditions = {k.removeprefix("cond."): v for k, v in tensors.items() if k.startswith("cond.")}
    empty = {k.removeprefix("empty."): v for k, v in tensors.items() if k.startswith("empty.")}
    return conditions, tensors.get("latents", torch.zeros(0)), empty or None
