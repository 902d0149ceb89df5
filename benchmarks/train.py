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


def dit_config(args: argparse.Namespace):
    if args.family == "wan":
        from ds_models_wan import WanDiTConfig

        if args.full:
            return WanDiTConfig.preset("wan2.1-t2v-1.3b")  # 1.42 B parameters
        # The 1.3B architecture at half its width and depth (about 0.2 B parameters).
        return WanDiTConfig(dim=768, ffn_dim=4480, num_heads=6, num_layers=15)
    from ds_models_flux import FluxDiTConfig

    if args.full:
        return FluxDiTConfig()  # FLUX.1-dev: 12 B parameters
    # The released architecture at a quarter of the width and depth (about 0.4 B parameters).
    return FluxDiTConfig(hidden_size=1024, num_heads=8, depth=4, depth_single_blocks=8, axes_dim=(16, 56, 56))


def build(args: argparse.Namespace, row: str, device: torch.device, dtype: torch.dtype):
    from ds_train import add_lora as add_adapters
    from ds_train import enable_gradient_checkpointing, get_adapter, resolve_targets
    from ds_vram import VRAMConfig, enable_vram_management

    torch.manual_seed(0)
    if args.family == "wan":
        from ds_models_wan import WanDiT as model_class
    else:
        from ds_models_flux import FluxDiT as model_class
    with torch.device("meta"):
        model = model_class(dit_config(args))
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


def step_inputs(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple:
    generator = torch.Generator().manual_seed(1)
    latent = args.size // 8
    config = dit_config(args)
    if args.family == "wan":
        shape = (args.batch, config.in_dim, (args.frames - 1) // 4 + 1, latent, latent)
        latents = torch.randn(shape, generator=generator).to(device, dtype)
        context = torch.randn(args.batch, config.text_len, config.text_dim, generator=generator)
        return latents, {"context": context.to(device, dtype)}
    latents = torch.randn(args.batch, 16, latent, latent, generator=generator).to(device, dtype)
    text_shape = (args.batch, args.text_tokens, config.context_in_dim)
    conditions = {
        "text": torch.randn(text_shape, generator=generator).to(device, dtype),
        "pooled": torch.randn(args.batch, config.vec_in_dim, generator=generator).to(device, dtype),
    }
    return latents, conditions


def run_row(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    before = memory_status()["RssAnon"]
    model, adapter = build(args, args.row, device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    latents, conditions = step_inputs(args, device, dtype)
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
    parser.add_argument("--family", choices=["flux.1", "wan"], default="flux.1")
    parser.add_argument("--full", action="store_true", help="FLUX.1-dev / Wan2.1-T2V-1.3B sizes (needs a GPU)")
    parser.add_argument("--size", type=int, default=512, help="image (frame) side in pixels")
    parser.add_argument("--frames", type=int, default=17, help="Wan: frames per clip (4k+1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=128)
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
    forwarded = ["--size", str(args.size), "--batch", str(args.batch), "--text-tokens", str(args.text_tokens)]
    forwarded += ["--family", args.family, "--frames", str(args.frames)]
    forwarded += ["--steps", str(args.steps), "--device", args.device, "--dtype", args.dtype]
    forwarded += ["--full"] if args.full else []
    results = []
    for row in args.rows:
        command = [sys.executable, __file__, *forwarded, "--rows", row, "--row", row]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    model = {"flux.1": "FLUX.1-dev", "wan": "Wan2.1-T2V-1.3B"}[args.family] if args.full else "mid-size"
    clip = f"{args.frames} frames of " if args.family == "wan" else ""
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
