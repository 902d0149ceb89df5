"""LoRA training step of a FLUX.1 or Wan DiT with ds_train's parts: time and peak memory per memory setting.

    uv run python benchmarks/train.py                         # CPU: a mid-size FLUX.1 config, 512x512, batch 1
    uv run python benchmarks/train.py --full --size 1024      # CUDA: FLUX.1-dev sizes (random weights, ~24 GB)
    uv run python benchmarks/train.py --family wan --size 256 --frames 17    # CPU: a mid-size Wan config
    uv run python benchmarks/train.py --family wan --full --size 480 --frames 49    # CUDA: Wan2.1-T2V-1.3B sizes

Each row is a fresh process running the same LoRA step (rank 16 on ds_train's family default targets, AdamW, flow
matching loss on random latents and text embeddings; Wan: a --size x --size clip of --frames frames and 512 umT5
context tokens) after one warm-up step, with:
  baseline        frozen weights resident in the computation dtype
  checkpointing   + gradient checkpointing of every block
  fp8             + frozen Linear weights stored in FP8 (ds-vram, per-channel scales)
  streaming       + frozen weights kept in CPU RAM and streamed to the device layer by layer (ds-vram)
Peak memory is the CUDA peak allocation on a GPU, and on the CPU the peak anonymous RSS growth since before the
model was built (weights included; streaming saves nothing there, as the CPU is both storage and computation).
The FLUX.1-dev target on a GPU is streaming + checkpointing at most 12 GiB at 1024x1024.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from vram import PeakSampler, memory_status  # the sampler of the ds-vram benchmark

ROWS = ("baseline", "checkpointing", "fp8", "streaming")

# What this benchmark measures for each family (its own choice of sizes, not a description of the family): the
# released preset whose DiT --full builds, the fields that shrink that DiT to a mid-size one for CPUs, the prompt
# tokens fed to it (None: the adapter's usual length) and the VAE's pixels per latent pixel. A family without a row
# is measured at its first released preset's DiT, with --full only.
SHAPES: dict[str, dict] = {
    "flux.1": {  # mid-size: the released architecture at a quarter of the width and depth (about 0.4 B parameters)
        "preset": "flux.1-dev",
        "mid_size": dict(hidden_size=1024, num_heads=8, depth=4, depth_single_blocks=8, axes_dim=(16, 56, 56)),
        "text_tokens": 128,
        "vae_factor": 8,
    },
    "wan": {  # mid-size: the 1.3B architecture at half its width and depth (about 0.2 B parameters)
        "preset": "wan2.1-t2v-1.3b",
        "mid_size": dict(dim=768, ffn_dim=4480, num_heads=6, num_layers=15),
        "text_tokens": None,
        "vae_factor": 8,
    },
}


def shape(args: argparse.Namespace) -> dict:
    return SHAPES.get(args.family, {"preset": None, "mid_size": None, "text_tokens": None, "vae_factor": 8})


def preset_name(args: argparse.Namespace) -> str:
    """The released preset whose DiT this run builds (--full) or shrinks."""
    from ds_pipelines import get_family

    family = get_family(args.family)
    if shape(args)["preset"] is not None:
        return shape(args)["preset"]
    for name, preset in family.presets.items():
        with contextlib.suppress(ValueError), torch.device("meta"):  # local demo models have no released size
            family.build_components(preset)
            return name
    raise SystemExit(f"family {args.family!r} has no released preset to size a DiT from")


def build_meta_dit(args: argparse.Namespace) -> torch.nn.Module:
    """The DiT on the meta device: the preset's (--full), or its mid-size variant."""
    from ds_pipelines import get_family

    family = get_family(args.family)
    with torch.device("meta"):
        dit = family.build_components(family.get_preset(preset_name(args)))["dit"]
        if args.full:
            return dit
        if shape(args)["mid_size"] is None:
            raise SystemExit(f"no mid-size {args.family} DiT in this benchmark's SHAPES; pass --full (on a GPU)")
        return type(dit)(dataclasses.replace(dit.config, **shape(args)["mid_size"]))


def build(args: argparse.Namespace, row: str, device: torch.device, dtype: torch.dtype):
    from ds_train import add_lora as add_adapters
    from ds_train import enable_gradient_checkpointing, get_adapter, resolve_targets
    from ds_vram import VRAMConfig, enable_vram_management

    torch.manual_seed(0)
    model = build_meta_dit(args)
    model.to_empty(device="cpu" if row == "streaming" else device)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    model.to(dtype).requires_grad_(False)
    adapter = get_adapter(args.family)
    if row in ("fp8", "streaming"):
        enable_vram_management(
            model,
            VRAMConfig(
                storage="cpu" if row == "streaming" else "device",
                storage_dtype="fp8" if row == "fp8" else None,
                computation_device=device,
                computation_dtype=dtype,
                vram_limit=0.0 if row == "streaming" else None,
            ),
        )
    add_adapters(model, resolve_targets(model, adapter.default_lora_targets), 16, 16.0, 0.0, device)
    if row != "baseline":
        enable_gradient_checkpointing(adapter.blocks(model))
    model.train()
    return model, adapter


def latent_frames(args: argparse.Namespace, adapter) -> int | None:
    return (args.frames - 1) // adapter.temporal_compression + 1 if adapter.default_num_frames else None


def step_inputs(args: argparse.Namespace, model, adapter, device: torch.device, dtype: torch.dtype) -> tuple:
    """Random latents and conditions of the shapes the adapter's ``predict`` feeds the DiT."""
    side = args.size // shape(args)["vae_factor"]
    text_tokens = args.text_tokens or shape(args)["text_tokens"]
    latents, conditions = adapter.random_inputs(
        model, args.batch, (side, side), latent_frames(args, adapter), text_tokens, torch.Generator().manual_seed(1)
    )
    return latents.to(device, dtype), {key: value.to(device, dtype) for key, value in conditions.items()}


def run_row(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    before = memory_status()["RssAnon"]
    model, adapter = build(args, args.row, device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    latents, conditions = step_inputs(args, model, adapter, device, dtype)
    sigmas = torch.full((args.batch,), 0.6, device=device)

    def step() -> float:
        noise = torch.randn_like(latents)
        sigma = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1 - sigma) * latents + sigma * noise
        prediction = adapter.predict(model, noisy.to(dtype), sigmas, conditions)
        loss = (prediction.float() - (noise - latents).float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: first-call layer order, allocator, optimizer state
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    sampler = PeakSampler() if device.type == "cpu" else contextlib.nullcontext()
    began = time.perf_counter()
    with sampler:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / args.steps
    peak = sampler.peak - before if device.type == "cpu" else torch.cuda.max_memory_allocated()
    return {"row": args.row, "seconds": seconds, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from ds_pipelines import get_family, list_families

    parser.add_argument("--family", choices=[family.id for family in list_families()], default=next(iter(SHAPES)))
    parser.add_argument("--full", action="store_true", help="the released preset's DiT (SHAPES; needs a GPU)")
    parser.add_argument("--size", type=int, default=512, help="image (frame) side in pixels")
    parser.add_argument("--frames", type=int, default=17, help="video families: frames per clip (1 + k * 4 for Wan)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=None, help="prompt tokens (default: SHAPES')")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.row:
        print(json.dumps(run_row(args)))
        return
    forwarded = ["--size", str(args.size), "--batch", str(args.batch)]
    forwarded += ["--text-tokens", str(args.text_tokens)] if args.text_tokens else []
    forwarded += ["--family", args.family, "--frames", str(args.frames)]
    forwarded += ["--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype]
    forwarded += ["--full"] if args.full else []
    results = []
    for row in args.rows:
        command = [sys.executable, __file__, *forwarded, "--rows", row, "--row", row]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    model = preset_name(args) if args.full else "mid-size"
    video = get_family(args.family).kind != "image"
    clip = f"{args.frames} frames of " if video else ""
    print(
        f"{args.family} LoRA step, {model} DiT, {clip}{args.size}px, batch {args.batch}, "
        f"{args.dtype}, {machine}, torch {torch.__version__}"
    )
    base = results[0]
    print(f"{'row':<15}{'s/step':>9}{'x base':>8}{'peak GiB':>10}{'x base':>8}")
    for result in results:
        print(
            f"{result['row']:<15}{result['seconds']:>9.2f}{result['seconds'] / base['seconds']:>8.2f}"
            f"{result['peak'] / 2**30:>10.2f}{result['peak'] / max(base['peak'], 1):>8.2f}"
        )


if __name__ == "__main__":
    main()
