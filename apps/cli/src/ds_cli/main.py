"""``diffsynth``: argument parsing and printing only; everything else lives in the packages."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

EXAMPLES = """examples:
  diffsynth generate --model flux.1-dev --prompt "a lighthouse at dawn" -o lighthouse.png
  diffsynth generate --model ./FLUX.1-schnell --prompt "a cat" --steps 4 --count 4 --vram-limit 6 --fp8
  diffsynth generate --model flux.1-dev --prompt "ink style" --lora ink.safetensors:0.8
  diffsynth models inspect flux1-dev.safetensors
"""


class UsageError(Exception):
    """A bad combination of arguments: exit code 2, like argparse's own errors."""


def _lora(value: str) -> tuple[str, float]:
    path, _, scale = value.rpartition(":")
    if not path or not scale:
        return value, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return value, 1.0  # a path that contains ':' and no scale


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffsynth",
        description="DiffSynth Studio: generate and inspect.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        help="generate images from a prompt",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument("--model", required=True, help="preset (flux.1-dev), model id, or local model folder")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt", default="")
    generate.add_argument(
        "-o", "--output", type=Path, default=Path("output.png"), help="PNG path (default %(default)s)"
    )
    generate.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    generate.add_argument("--count", type=int, default=1, help="images to make, seeds counting up from --seed")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    generate.add_argument("--height", type=int, default=1024)
    generate.add_argument("--width", type=int, default=1024)
    generate.add_argument("--cfg-scale", type=float, default=1.0, help="true classifier-free guidance (1: off)")
    generate.add_argument("--guidance", type=float, default=None, help="embedded guidance (FLUX.1-dev: 3.5)")
    generate.add_argument("--sigma-shift", type=float, default=None)
    generate.add_argument("--input-image", type=Path, help="start from this image (image-to-image)")
    generate.add_argument("--strength", type=float, default=1.0, help="denoising strength with --input-image")
    generate.add_argument(
        "--lora", action="append", type=_lora, default=[], metavar="PATH[:SCALE]", help="apply a LoRA (repeatable)"
    )
    generate.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    generate.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    generate.add_argument("--vram-limit", type=float, default=None, help="GiB of weights kept on the GPU")
    generate.add_argument("--fp8", action="store_true", help="store weights in FP8 (e4m3fn, per-channel scales)")
    generate.add_argument(
        "--storage",
        choices=["device", "cpu", "disk"],
        default=None,
        help="where weights sit between uses (default: cpu when --vram-limit or --fp8)",
    )
    generate.add_argument("--tiled", action="store_true", help="tiled VAE encode and decode")

    models = commands.add_parser("models", help="inspect model files")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    inspect = model_commands.add_parser("inspect", help="what ds-loader detects in a checkpoint, as a table")
    inspect.add_argument("path", type=Path)
    return parser


def _free_paths(output: Path, count: int, overwrite: bool) -> list[Path]:
    """Output paths for ``count`` images that overwrite nothing unless asked."""
    if output.suffix.lower() != ".png":
        raise UsageError(f"--output {output}: images are written as PNG; use a .png name")
    stems = [output] if count == 1 else [output.with_name(f"{output.stem}-{i:04d}.png") for i in range(count)]
    if overwrite:
        return stems
    result = []
    for path in stems:
        candidate, number = path, 1
        while candidate.exists() or candidate in result:
            candidate = path.with_name(f"{path.stem}-{number}.png")
            number += 1
        result.append(candidate)
    return result


def _vram_config(args: argparse.Namespace, dtype: object) -> object | None:
    if args.vram_limit is None and not args.fp8 and args.storage is None:
        return None
    from ds_vram import VRAMConfig

    return VRAMConfig(
        storage=args.storage or "cpu",
        storage_dtype="fp8" if args.fp8 else None,
        computation_device=args.device,
        computation_dtype=dtype,
        vram_limit=args.vram_limit,
    )


def run_generate(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from ds_pipelines import FluxImagePipeline, save_image

    if args.count < 1:
        raise UsageError(f"--count {args.count}: must be at least 1")
    outputs = _free_paths(args.output, args.count, args.overwrite)
    input_image = None
    if args.input_image is not None:
        if not args.input_image.is_file():
            raise FileNotFoundError(f"--input-image {args.input_image}: no such file")
        input_image = Image.open(args.input_image).convert("RGB")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    pipe = FluxImagePipeline.from_pretrained(
        args.model, torch_dtype=dtype, device=args.device, vram=_vram_config(args, dtype)
    )
    for path, scale in args.lora:
        pipe.load_lora(path, scale=scale)
    options = dict(
        negative_prompt=args.negative_prompt,
        cfg_scale=args.cfg_scale,
        height=args.height,
        width=args.width,
        input_image=input_image,
        denoising_strength=args.strength,
        sigma_shift=args.sigma_shift,
        tiled=args.tiled,
    )
    if args.steps is not None:
        options["num_inference_steps"] = args.steps
    if args.guidance is not None:
        options["embedded_guidance"] = args.guidance
    for index, path in enumerate(outputs):
        image = pipe(args.prompt, seed=args.seed + index, **options)
        save_image(image, path)
        print(path)


def run_inspect(args: argparse.Namespace) -> None:
    from ds_loader import inspect_checkpoint

    if not args.path.exists():
        raise FileNotFoundError(f"{args.path}: no such file or folder")
    print(inspect_checkpoint(args.path))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if args.command == "generate":
            run_generate(args)
        else:
            run_inspect(args)
    except UsageError as error:
        parser.print_usage(sys.stderr)
        print(f"diffsynth: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffsynth: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; the traceback with --debug
        if args.debug:
            traceback.print_exc()
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"diffsynth: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
