"""Wan VAE decode: our WanVAE / WanVAE22 against diffusers' AutoencoderKLWan on identical weights.

    uv run python benchmarks/wan.py                      # CPU: 81 frames at 480x832, 2.1 VAE at width 16
    uv run python benchmarks/wan.py --frames 21 --height 240 --width 416    # a quicker CPU run
    uv run python benchmarks/wan.py --full --dtype bfloat16 --version 2.2  # GPU: the released VAE widths

Each row decodes the latents of a ``--frames`` x ``--height`` x ``--width`` video once after a warm-up on a short
clip: untiled, and tiled with the same tiles on both sides (ours: ``tile_size``/``tile_stride`` in latents;
diffusers: the same tiles in pixels through ``enable_tiling``). Weights are random (scaled so activations stay
in range), written once as a diffusers folder and loaded by both (ours through ds_loader). Peak memory is the CUDA
peak allocation on a GPU (weights included, identical for both), and the anonymous RSS growth during the decode
on the CPU (the decoded video itself, 4 bytes x 3 x frames x height x width in float32, included).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from vram import PeakSampler, memory_status  # the sampler of the ds-vram benchmark


def vae_config(args: argparse.Namespace) -> dict:
    """diffusers AutoencoderKLWan arguments: the released sizes with --full, else the same architecture at --dim."""
    from ds_models_wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD
    from ds_models_wan.vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

    if args.version == "2.1":
        return {
            "base_dim": 96 if args.full else args.dim,
            "z_dim": 16,
            "latents_mean": list(WAN21_LATENTS_MEAN),
            "latents_std": list(WAN21_LATENTS_STD),
        }
    return {
        "base_dim": 160 if args.full else args.dim,
        "decoder_base_dim": 256 if args.full else args.dim,
        "z_dim": 48,
        "is_residual": True,
        "in_channels": 12,
        "out_channels": 12,
        "patch_size": 2,
        "scale_factor_spatial": 16,
        "latents_mean": list(WAN22_LATENTS_MEAN),
        "latents_std": list(WAN22_LATENTS_STD),
    }


def build(args: argparse.Namespace, folder: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import AutoencoderKLWan

    from ds_loader import load_model
    from ds_models_wan.vae_specs import VAE21_SPEC, VAE22_SPEC

    with torch.device("meta"):
        theirs = AutoencoderKLWan(**vae_config(args))
    theirs = theirs.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if name.endswith("gamma"):
                parameter.normal_(1.0, 0.2, generator=generator)
            elif parameter.ndim >= 2:  # unit-variance activations through the convolutions
                parameter.normal_(0.0, math.prod(parameter.shape[1:]) ** -0.5, generator=generator)
            else:
                parameter.normal_(0.0, 0.05, generator=generator)
    theirs.save_pretrained(folder)
    del theirs
    theirs = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype).to(args.device).eval()
    spec = VAE21_SPEC if args.version == "2.1" else VAE22_SPEC
    ours = load_model(folder, device=args.device, torch_dtype=dtype, spec=spec)
    return ours, theirs


def release_heap() -> None:
    """Return freed heap pages to the OS, so each row's RSS growth starts from the same floor (glibc only)."""
    # not glibc: rows measured later may reuse pages freed by earlier ones
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn, device: torch.device) -> tuple[torch.Tensor, float, int]:
    """Run ``fn`` once: its output, the seconds it took and its peak memory (see the module docstring)."""
    release_heap()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = memory_status()["RssAnon"]
    with PeakSampler() as sampler:
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else sampler.peak - before
    return out, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="2.1", choices=["2.1", "2.2"])
    parser.add_argument("--dim", type=int, default=16, help="base width of the tiny-width VAE (released: 96/160)")
    parser.add_argument("--full", action="store_true", help="the released widths (2.1: 127 M, 2.2: 705 M parameters)")
    parser.add_argument("--frames", type=int, default=81, help="video frames, 4k + 1")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--tile-size", type=int, nargs=2, default=(30, 52), help="latents (height, width)")
    parser.add_argument("--tile-stride", type=int, nargs=2, default=(15, 26), help="latents (height, width)")
    parser.add_argument("--repeats", type=int, default=1, help="decodes per row (the median is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.frames % 4 != 1:
        parser.error(f"--frames must be 4k + 1, got {args.frames}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    scale = 8 if args.version == "2.1" else 16
    if args.height % scale or args.width % scale:
        parser.error(f"--height and --width must be multiples of {scale} for the {args.version} VAE")
    workdir = tempfile.TemporaryDirectory()
    ours, theirs = build(args, workdir.name, dtype)
    z_dim = ours.z_dim
    shape = (1, z_dim, (args.frames - 1) // 4 + 1, args.height // scale, args.width // scale)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    mean = ours.latents_mean.to(device, dtype).view(1, -1, 1, 1, 1)
    std = ours.latents_std.to(device, dtype).view(1, -1, 1, 1, 1)
    raw = latents * std + mean  # diffusers decodes raw latents; ours takes normalised ones
    tile, stride = tuple(args.tile_size), tuple(args.tile_stride)

    def set_tiling(tiled: bool) -> None:
        if tiled:  # the same tiles in pixels (diffusers measures them in decoded samples)
            theirs.enable_tiling(tile[0] * scale, tile[1] * scale, stride[0] * scale, stride[1] * scale)
        else:
            theirs.disable_tiling()

    rows = {
        "ours": lambda: ours.decode(latents),
        "diffusers": lambda: theirs.decode(raw).sample,
        "ours tiled": lambda: ours.decode(latents, tiled=True, tile_size=tile, tile_stride=stride),
        "diffusers tiled": lambda: theirs.decode(raw).sample,
    }
    results: dict[str, tuple[float, int]] = {}
    errors: dict[str, float] = {}
    with torch.no_grad():
        short = latents[:, :, :2, : tile[0], : tile[1]]  # warm-up: kernels, allocator
        ours.decode(short)
        theirs.decode(short * std + mean)
        reference = None
        for name, fn in rows.items():
            set_tiling(name.endswith("tiled"))
            times, peaks = [], []
            for _ in range(args.repeats):
                out, seconds, peak = measure(fn, device)
                times.append(seconds)
                peaks.append(peak)
            if name == "ours":
                reference = out.float()
            else:
                errors[name] = ((out.float() - reference).norm() / reference.norm()).item()
            del out
            results[name] = (statistics.median(times), max(peaks))
    workdir.cleanup()
    width = f"released widths (dim {vae_config(args)['base_dim']})" if args.full else f"width {args.dim}"
    print(
        f"Wan {args.version} VAE decode: {args.frames} frames at {args.height}x{args.width} ({shape[2]} latent "
        f"frames), {width}, {args.dtype} on {device}; tiles {tile} every {stride} latents"
    )
    cpu = f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {cpu}{gpu}, torch {torch.__version__}")
    print("relative difference to ours untiled: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    memory = "CUDA peak GiB" if device.type == "cuda" else "extra anon GiB"
    print(f"{'row':<16} {'decode s':>9} {'time ratio':>11} {memory:>15} {'memory ratio':>13}")
    for name, (seconds, peak) in results.items():
        other = "diffusers tiled" if name.endswith("tiled") else "diffusers"
        base_s, base_peak = results[other]
        print(
            f"{name:<16} {seconds:>9.2f} {seconds / base_s:>11.2f} {peak / 1024**3:>15.3f} "
            f"{peak / max(base_peak, 1):>13.2f}"
        )
    print("ratios: each row against diffusers in the same mode (tiled or not)")


# ---------------------------------------------------------------------- DiT step rows
DIT_DOC = """Wan DiT denoising step: our WanDiT against diffusers' WanTransformer3DModel on identical weights.

    uv run python benchmarks/wan.py dit                  # CPU: 4 blocks of width 512, 17 frames at 240x416
    uv run python benchmarks/wan.py dit --full --dtype bfloat16 --frames 81 --height 480 --width 832   # GPU: 1.3B

One step is one transformer call (conditional only) on the latents of the video and 512 umT5 tokens, plus the Euler
update; both models run in this process, alternately, and each row is the median of --repeats steps. Weights are
random (normal, std 0.02), written once as a diffusers folder and loaded by both (ours through ds_loader).
"""


def build_dit(args: argparse.Namespace, folder: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import WanTransformer3DModel

    from ds_loader import load_model

    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=12 if args.full else args.width_dit // 128,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960 if args.full else 3 * args.width_dit,
        num_layers=30 if args.full else args.layers,
    )
    with torch.device("meta"):
        theirs = WanTransformer3DModel(**config)
    theirs = theirs.to_empty(device="cpu")
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in theirs.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    theirs.save_pretrained(folder)
    del theirs
    theirs = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).to(args.device).eval()
    ours = load_model(folder, device=args.device, torch_dtype=dtype, spec="wan.dit")
    return ours, theirs


def dit_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="wan.py dit", description=DIT_DOC, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width-dit", type=int, default=512, help="model width (multiple of 128; released 1536/5120)")
    parser.add_argument("--layers", type=int, default=4, help="blocks (released: 30 for 1.3B, 40 for 14B)")
    parser.add_argument("--full", action="store_true", help="Wan2.1-T2V-1.3B sizes (dim 1536, 30 blocks)")
    parser.add_argument("--frames", type=int, default=17, help="video frames, 4k + 1")
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=416)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.frames % 4 != 1 or args.height % 16 or args.width % 16:
        parser.error("--frames must be 4k + 1 and --height/--width multiples of 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    workdir = tempfile.TemporaryDirectory()
    ours, theirs = build_dit(args, workdir.name, dtype)
    generator = torch.Generator().manual_seed(1)
    shape = (1, 16, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    latents = torch.randn(shape, generator=generator).to(device, dtype)
    context = torch.randn(1, 512, 4096, generator=generator).to(device, dtype)
    timestep = torch.tensor([700.0], device=device)
    tokens = shape[2] * (shape[3] // 2) * (shape[4] // 2)

    steps = {
        "diffusers": lambda: latents - 0.1 * theirs(latents, timestep, context, return_dict=False)[0],
        "ours": lambda: latents - 0.1 * ours(latents, timestep, context),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, 0)
    with torch.no_grad():
        for step in steps.values():  # warm-up
            step()
        velocity = ours(latents, timestep, context).float()  # the predictions must agree
        reference = theirs(latents, timestep, context, return_dict=False)[0].float()
        difference = ((velocity - reference).norm() / reference.norm()).item()
        del velocity, reference
        for _ in range(args.repeats):
            for name, step in steps.items():
                out, seconds, peak = measure(step, device)
                del out
                times[name].append(seconds)
                peaks[name] = max(peaks[name], peak)
    workdir.cleanup()
    width = "1.3B sizes (dim 1536, 30 blocks)" if args.full else f"width {args.width_dit}, {args.layers} blocks"
    print(
        f"Wan DiT step: {width}, {args.frames} frames at {args.height}x{args.width} ({tokens} video + 512 text "
        f"tokens), {args.dtype} on {device}"
    )
    cpu = f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"machine: {cpu}{gpu}, torch {torch.__version__}")
    print(f"relative difference of the predicted velocity, ours vs diffusers: {difference:.1e}")
    memory = "CUDA peak GiB" if device.type == "cuda" else "extra anon GiB"
    print(f"{'row':<10} {'step s':>8} {'x diffusers':>12} {memory:>15}")
    base = statistics.median(times["diffusers"])
    for name in steps:
        seconds = statistics.median(times[name])
        print(f"{name:<10} {seconds:>8.3f} {seconds / base:>12.2f} {peaks[name] / 1024**3:>15.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["dit"]:
        dit_main(sys.argv[2:])
    else:
        main()
