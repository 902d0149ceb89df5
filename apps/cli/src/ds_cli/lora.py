"""``diffsynth lora inspect | convert | merge``."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

from ds_cli import options as types
from ds_cli.common import UsageError, formatter, printable

EXAMPLES = """examples:
  diffsynth lora inspect style.safetensors
  diffsynth lora convert style.safetensors --to comfyui -o style-comfyui.safetensors
  diffsynth lora merge ink.safetensors paper.safetensors --weights 0.7 0.3 -o ink-paper.safetensors

Formats: kohya (lora_unet_* names, lora_down/lora_up, alpha), comfyui (diffusion_model.* names),
diffusers (transformer.* names, lora_A/lora_B). Written files carry alpha and ss_*/modelspec.* metadata.
The model family is told from the layer names; --family (a family id, see `diffsynth models list`) overrides it.
"""
FORMATS = ("comfyui", "diffusers", "kohya")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lora", help="inspect, convert and merge LoRA files", epilog=EXAMPLES, **formatter()
    )
    commands = parser.add_subparsers(dest="lora_command", required=True, metavar="SUBCOMMAND")
    inspect = commands.add_parser(
        "inspect", help="format, rank, alpha, target modules and metadata", epilog=EXAMPLES, **formatter()
    )
    inspect.add_argument("path", type=Path)
    convert = commands.add_parser("convert", help="rewrite a LoRA in another format", epilog=EXAMPLES, **formatter())
    convert.add_argument("path", type=Path)
    convert.add_argument("--to", required=True, choices=FORMATS)
    convert.add_argument("-o", "--output", type=Path, help="default: NAME-FORMAT.safetensors beside the input")
    convert.add_argument("--overwrite", action="store_true")
    convert.add_argument("--family", type=types.family_id, help="model family of the LoRA (default: from its names)")
    merge = commands.add_parser("merge", help="combine LoRAs into one file", epilog=EXAMPLES, **formatter())
    merge.add_argument("paths", type=Path, nargs="+", metavar="PATH")
    merge.add_argument("--weights", type=types.finite_float, nargs="+", help="one scale per file (default: 1 each)")
    merge.add_argument("--to", choices=FORMATS, help="format of the result (default: that of the first file)")
    merge.add_argument("-o", "--output", type=Path, required=True)
    merge.add_argument("--overwrite", action="store_true")
    merge.add_argument("--family", type=types.family_id, help="model family of the LoRAs (default: from their names)")


def _function(name: str) -> Callable:
    """A LoRA writer of ds-pipelines (``ds_pipelines.lora_io``)."""
    import ds_pipelines

    function = getattr(ds_pipelines, name, None)
    if function is None:
        try:
            from ds_pipelines import lora_io
        except ImportError:
            lora_io = None
        function = getattr(lora_io, name, None)
    if function is None:
        raise RuntimeError(f"{name} is not in this installation of ds-pipelines; update it")
    return function


def _check_output(output: Path, overwrite: bool) -> None:
    if output.suffix != ".safetensors":
        raise UsageError(f"--output {output}: LoRA files are written as .safetensors")
    if output.exists() and not overwrite:
        raise UsageError(f"--output {output} exists; pass --overwrite to replace it")


def _inspect(args: argparse.Namespace) -> int:
    from ds_pipelines import inspect_lora

    info = inspect_lora(args.path)
    # Metadata, key names and the path are the file's text: escaped one by one, so that a newline or escape in
    # them cannot forge lines or drive the terminal; the layout's own newlines stay.
    info = dataclasses.replace(
        info,
        path=printable(info.path),
        metadata={printable(key): printable(value) for key, value in info.metadata.items()},
        targets={printable(target): count for target, count in info.targets.items()},
        unknown_keys=tuple(printable(key) for key in info.unknown_keys),
    )
    print(printable(info, keep="\n"))
    return 0


def _convert(args: argparse.Namespace) -> int:
    if not args.path.is_file():
        raise FileNotFoundError(f"{args.path}: no such file")
    output = args.output or args.path.with_name(f"{args.path.stem}-{args.to}.safetensors")
    _check_output(output, args.overwrite)
    convert = _function("convert_lora_file")
    written = convert(args.path, output, to=args.to, family=args.family, overwrite=args.overwrite)
    print(written)  # a run that wrote the same name meanwhile keeps its file: this one is then NAME-1.safetensors
    return 0


def _merge(args: argparse.Namespace) -> int:
    weights = args.weights or [1.0] * len(args.paths)
    if len(weights) != len(args.paths):
        raise UsageError(f"--weights has {len(weights)} values for {len(args.paths)} files; give one per file")
    for path in args.paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    _check_output(args.output, args.overwrite)
    target = args.to
    if target is None:
        from ds_pipelines import inspect_lora

        first = inspect_lora(args.paths[0]).format
        target = first if first in FORMATS else "comfyui"
    sources = list(zip(args.paths, weights, strict=True))
    merge = _function("merge_lora_files")
    written = merge(sources, args.output, to=target, family=args.family, overwrite=args.overwrite)
    print(written)  # as in _convert: the name really written
    return 0


def run(args: argparse.Namespace) -> int:
    return {"inspect": _inspect, "convert": _convert, "merge": _merge}[args.lora_command](args)
