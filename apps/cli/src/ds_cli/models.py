"""``diffsynth models list | download | inspect``."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ds_cli import options as types
from ds_cli.common import formatter, gib, printable, table

if TYPE_CHECKING:  # ds_pipelines is imported when a command runs, so that --help stays fast
    from ds_pipelines import MemoryNeed

ESTIMATED_FOOTNOTE = "~ estimated: no GPU measurement recorded yet; run benchmarks/memory.py on a GPU"

EXAMPLES = """examples:
  diffsynth models list                      # every preset of every installed family, sizes, memory needs
  diffsynth models list --height 512 --width 512
  diffsynth models download flux.1-schnell   # into $DIFFSYNTH_MODEL_BASE_PATH (default ./models)
  diffsynth models download flux.1-dev --source huggingface
  diffsynth models inspect flux1-dev.safetensors

Memory columns are the peak GPU memory of one generation at the model's default size: measured on a GPU where
benchmarks/memory.py recorded it, else estimated and marked "~" (see "diffsynth vram --help"):
  resident  every model on the GPU in bf16          (no flags)
  offload   one model at a time in bf16             (--storage cpu)
  fp8       one model at a time, weights in FP8     (--fp8)
  stream    layers fetched as they run              (--vram-limit 0 --fp8)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list, download and inspect models", epilog=EXAMPLES, **formatter())
    commands = parser.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    listing = commands.add_parser(
        "list", help="presets with sizes and the memory each VRAM setting needs", epilog=EXAMPLES, **formatter()
    )
    listing.add_argument("--family", action="append", type=types.family_id, help="only this family's id (repeatable)")
    listing.add_argument("--height", type=int, help="size the estimates for this height (default: the model's)")
    listing.add_argument("--width", type=int, help="size the estimates for this width (default: the model's)")
    listing.add_argument("--frames", type=int, help="size video estimates for this many frames")
    download = commands.add_parser("download", help="fetch a preset's files", epilog=EXAMPLES, **formatter())
    download.add_argument("name", help="a preset name or model id (see: diffsynth models list)")
    download.add_argument(
        "--source", choices=("modelscope", "huggingface"), help="default: $DIFFSYNTH_DOWNLOAD_SOURCE"
    )
    inspect = commands.add_parser(
        "inspect", help="what ds-loader detects in a checkpoint, as a table", epilog=EXAMPLES, **formatter()
    )
    inspect.add_argument("path", type=Path, help="a .safetensors file, a sharded index, or a model folder")


def _list(args: argparse.Namespace) -> int:
    from ds_pipelines import MEMORY_SETTINGS, list_models, memory_need

    entries = list_models(tuple(args.family) if args.family else None)
    if not entries:
        raise RuntimeError("no models found: install a family package (ds-models-<family>)")
    rows = [("name", "family", "kind", "params", "bf16 weights", *MEMORY_SETTINGS)]
    estimated = False
    for entry in entries:
        needs = [memory_need(entry, s, args.height, args.width, args.frames) for s in MEMORY_SETTINGS]
        estimated |= any(not need.measured and need.bytes is not None for need in needs)
        params = _count(entry.parameters) if entry.components else "?"
        size = gib(entry.bf16_bytes) if entry.components else "?"
        rows.append((entry.name, entry.family, entry.kind, params, size, *map(need_text, needs)))
    print(table(rows, right=range(3, 5 + len(MEMORY_SETTINGS))))
    if estimated:
        print(f"\n{ESTIMATED_FOOTNOTE}", file=sys.stderr)
    return 0


def _download(args: argparse.Namespace) -> int:
    from ds_pipelines import download_model, get_model_entry

    entry = get_model_entry(args.name)
    print(f"downloading {entry.name} ({gib(entry.bf16_bytes)} in bf16) ...", file=sys.stderr)
    paths = download_model(entry.name, args.source)
    for component, files in paths.items():
        for path in files:
            print(f"{component}\t{path}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from ds_pipelines import inspect_checkpoint

    if not args.path.exists():
        raise FileNotFoundError(f"{args.path}: no such file or folder")
    report = inspect_checkpoint(args.path)
    # Component names, file names and notes (which quote key names) come from the files: escaped one by one so
    # that none can add a line or drive the terminal; the table's own newlines stay.
    entries = tuple(
        dataclasses.replace(
            entry, component=entry.component and printable(entry.component), note=printable(entry.note)
        )
        for entry in report.entries
    )
    print(printable(dataclasses.replace(report, path=printable(report.path), entries=entries), keep="\n"))
    return 0


def run(args: argparse.Namespace) -> int:
    return {"list": _list, "download": _download, "inspect": _inspect}[args.models_command](args)


def need_text(need: MemoryNeed) -> str:
    """A ``MemoryNeed`` in GiB: plain when a GPU measured it, ``~`` before an estimate, ``?`` when unsized."""
    if need.bytes is None:
        return "?"
    return gib(need.bytes) if need.measured else f"~{gib(need.bytes)}"


def _count(parameters: int) -> str:
    """1.42B, 3.9M: billions for released models, millions for the demo and tiny ones."""
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e8 else f"{parameters / 1e6:.1f}M"
