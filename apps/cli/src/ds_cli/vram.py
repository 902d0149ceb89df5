"""``diffsynth vram``: the VRAM settings to use for a model on a GPU of a given size."""

from __future__ import annotations

import argparse

from ds_cli import options as types
from ds_cli.common import formatter, gib, table
from ds_cli.models import ESTIMATED_FOOTNOTE, need_text

EXAMPLES = """examples:
  diffsynth vram --model flux.1-dev --gpu-memory 8
  diffsynth vram --model flux.1-dev --gpu-memory 24 --height 1536 --width 1536
  diffsynth vram --model wan2.1-t2v-14b --gpu-memory 16 --frames 81

Needs are peak GPU memory measured by benchmarks/memory.py on a CUDA GPU where one is recorded for this model,
setting and size; otherwise estimated (marked "~") by this rule, from parameter counts of the released configs:
  need = weights on the GPU + activations + 1 GiB (CUDA context, cuBLAS workspace, allocator slack)
  weights: resident = all models in bf16; offload = the largest model in bf16; fp8 = the largest model in
           FP8 (Linear/Conv/Embedding weights, 1 byte + a float32 scale per output channel); stream = three
           of the largest layers (one computing, two prefetched).
  activations: the larger of the DiT's (tokens x its widest Linear x 2 bytes x 3 live tensors) and the VAE
           decoder's (3 KiB per output pixel and frame, 4 frames at a time for video; calibrated on FLUX.1-dev's
           measured 4.5 GiB between loaded and peak memory at 1024x1024).
The first setting that fits wins: resident, offload, fp8; otherwise FP8 weights stream with --vram-limit set
to what the activations and the layers in flight leave free. Leave a margin for other programs on the GPU.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "vram", help="suggest VRAM settings for a model on a GPU size", epilog=EXAMPLES, **formatter()
    )
    parser.add_argument("--model", required=True, help="a preset name or model id (see: diffsynth models list)")
    parser.add_argument(
        "--gpu-memory", type=types.positive_float, required=True, metavar="GIB", help="the GPU's memory in GiB"
    )
    parser.add_argument("--height", type=types.positive_int, help="output height (default: the model's)")
    parser.add_argument("--width", type=types.positive_int, help="output width (default: the model's)")
    parser.add_argument("--frames", type=types.positive_int, help="video frames (default: the model's)")


def _flags(suggestion: object) -> str:
    if suggestion.setting == "resident":
        return "(none needed)"
    flags = [f"--storage {suggestion.storage}"]
    if suggestion.storage_dtype:
        flags.append("--fp8")
    if suggestion.vram_limit is not None:
        flags.append(f"--vram-limit {suggestion.vram_limit:g}")
    return " ".join(flags)


def run(args: argparse.Namespace) -> int:
    from ds_pipelines import MEMORY_SETTINGS, get_model_entry, memory_need, suggest_vram

    entry = get_model_entry(args.model)
    types.check_size(entry, {"height": args.height, "width": args.width, "frames": args.frames})
    suggestion = suggest_vram(entry, args.gpu_memory, args.height, args.width, args.frames)
    kwargs = suggestion.vram_config_kwargs()
    config = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    print(f"model      {entry.name} ({entry.parameters / 1e9:.2f}B parameters, {gib(entry.bf16_bytes)} in bf16)")
    print(f"gpu        {args.gpu_memory:g} GiB")
    print(f"setting    {suggestion.setting}: {suggestion.reason}")
    print(f"VRAMConfig({config})" if kwargs else "VRAMConfig: none (keep every model on the GPU)")
    print(f"cli flags  {_flags(suggestion)}")
    if not suggestion.fits:
        print("warning    no setting fits this GPU at this size; expect out-of-memory errors")
    rows = [("setting", "need", "fits")]
    estimated = False
    for setting in MEMORY_SETTINGS:
        need = memory_need(entry, setting, args.height, args.width, args.frames)
        estimated |= not need.measured
        rows.append((setting, need_text(need), "yes" if need.bytes <= args.gpu_memory * 1024**3 else "no"))
    print()
    print(table(rows, right=(1,)))
    if estimated:
        print(ESTIMATED_FOOTNOTE)
    return 0
