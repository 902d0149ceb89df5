"""Encode prompts and images once, into one safetensors file per sample, and train from those files.

A cached sample holds the family's conditions (FLUX.1: ``text``, ``pooled``; Wan: ``context``, and for image-to-video
models the first frame's ``condition`` and ``clip_feature``) and ``latents``, without the batch dimension;
``empty.safetensors`` holds the empty prompt's conditions (caption dropout replaces only those). Each file records the
caption, image size and model it was made from, so a changed dataset or model re-encodes instead of reusing
stale files. Uncached training encodes sample by sample in the same way, so both give the same numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ds_pipelines import save_safetensors_atomic

from .data import ImageDataset
from .family import TrainingAdapter

__all__ = ["EncodedSample", "build_cache", "encode_sample", "load_cached"]

EncodedSample = tuple[dict[str, torch.Tensor], torch.Tensor]  # conditions, latents (no batch dimension)


@torch.no_grad()
def encode_sample(adapter: TrainingAdapter, pipe: Any, pixels: torch.Tensor | None, prompt: str) -> EncodedSample:
    """One sample's conditions and latents (``pixels`` (3, H, W) in [-1, 1]; None encodes the prompt only)."""
    conditions = {k: v[0].detach() for k, v in adapter.encode_prompts(pipe, [prompt]).items()}
    if pixels is None:
        return conditions, torch.zeros(0)
    latents = adapter.encode_images(pipe, pixels[None]).detach()[0]
    for key, value in adapter.encode_pixel_conditions(pipe, pixels[None], latents[None]).items():
        conditions[key] = value[0].detach()
    return conditions, latents


def _identity(dataset: ImageDataset, index: int, model: str) -> str:
    sample = dataset.samples[index]
    width, height, frames = dataset.shape_of(index)
    return json.dumps(
        {
            "image": str(sample.image),
            "caption": sample.caption,
            "size": [width, height],
            "frames": frames,
            "frame_stride": dataset.frame_stride,
            "model": model,
        }
    )


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
        conditions, latents = encode_sample(adapter, pipe, item["pixels"], item["prompt"])
        tensors = {f"cond.{k}": v.cpu() for k, v in conditions.items()} | {"latents": latents.cpu()}
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
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    conditions = {k.removeprefix("cond."): v for k, v in tensors.items() if k.startswith("cond.")}
    return conditions, tensors.get("latents", torch.zeros(0))
