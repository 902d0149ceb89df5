"""``diffsynth train lora|full``: ``ds_train.TrainingConfig`` from the command line; the run itself is ds_train's."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from ds_cli import options as types
from ds_cli.common import UsageError, formatter
from ds_pipelines import get_family, list_families
from ds_train import TrainingConfig, declared_family_options, parse_option_value, train

EXAMPLES = """examples:
  diffsynth train lora --model flux.1-dev --data ./photos --output runs/style --steps 1000 --rank 16
  diffsynth train lora --model ./FLUX.1-dev --data metadata.csv --output runs/low --stream-frozen --vram-limit 6 \\
      --gradient-checkpointing --cache --lora-format diffusers
  diffsynth train full --model demo-digits --data ./digits --output runs/digits --height 32 --width 32 \\
      --mixed-precision no --device cpu
  diffsynth train lora --model wan2.1-t2v-1.3b --data ./clips --output runs/motion --num-frames 49 \\
      --height 480 --width 832 --gradient-checkpointing --cache
  diffsynth train lora --model wan2.2-t2v-a14b --data ./clips --output runs/high --expert high_noise --fp8-frozen
  diffsynth train lora ... --resume                   # continue from <output>/checkpoints

The run folder holds checkpoints/, samples/, log.csv, loss.png, config.json and the final weights
(lora.safetensors, or <component>.safetensors in full mode); its path is printed on stdout.
Under `accelerate launch` the same command trains on several GPUs (DDP/FSDP from accelerate's config).
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="preset, model id or local folder (official or diffusers)")
    families = list_families()
    parser.add_argument(
        "--family", choices=[f.id for f in families], default=None, help="default: recognised from --model's DiT"
    )
    parser.add_argument(
        "--data", required=True, type=Path, help="folder of images (and videos) with .txt captions, or metadata"
    )
    parser.add_argument("--output", required=True, type=Path, help="run folder")
    parser.add_argument("--steps", type=types.positive_int, default=1000)
    parser.add_argument("--batch-size", type=types.positive_int, default=1)
    parser.add_argument("--gradient-accumulation", type=types.positive_int, default=1)
    parser.add_argument(
        "--learning-rate", type=types.positive_float, default=None, help="default: 1e-4 (lora), 1e-5 (full)"
    )
    parser.add_argument("--lr-scheduler", choices=["constant", "linear", "cosine"], default="constant")
    parser.add_argument("--lr-warmup-steps", type=types.non_negative_int, default=0)
    parser.add_argument(
        "--height", type=types.positive_int, default=None, help=f"default: the family's ({_sizes(families, 0)})"
    )
    parser.add_argument(
        "--width", type=types.positive_int, default=None, help=f"default: the family's ({_sizes(families, 1)})"
    )
    parser.add_argument(
        "--num-frames",
        type=types.positive_int,
        default=None,
        help="video families: frames per clip (default: the family's)",
    )
    parser.add_argument(
        "--frame-stride", type=types.positive_int, default=1, help="video families: take every n-th frame of a video"
    )
    parser.add_argument(
        "--sigma-shift", type=types.positive_float, default=None, help="training sigma shift (default: family's)"
    )
    parser.add_argument("--buckets", action="store_true", help="aspect-ratio buckets instead of a centre crop")
    parser.add_argument("--repeats", type=types.positive_int, default=1, help="times each image appears per epoch")
    parser.add_argument(
        "--caption-dropout", type=types.fraction, default=0.0, help="share of steps on the empty prompt, in [0, 1)"
    )
    parser.add_argument("--skip-broken", action="store_true", help="drop broken dataset rows with a warning")
    parser.add_argument("--seed", type=types.train_seed_int, default=0, help="in [0, 2**32-1] (default: 0)")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default="bf16")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: accelerate's choice)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--offload-activations", action="store_true", help="checkpointed activations in CPU RAM")
    parser.add_argument("--cache", action="store_true", help="encode prompts and latents once to safetensors")
    parser.add_argument(
        "--checkpoint-every", type=types.non_negative_int, default=500, help="steps between checkpoints (0: none)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.add_argument(
        "--sample-every", type=types.non_negative_int, default=0, help="steps between sample images (0: none)"
    )
    parser.add_argument(
        "--sample-prompt", action="append", default=[], dest="sample_prompts", metavar="PROMPT", type=types.utf8_text
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _family_flags(parser)


def _sizes(families: list, axis: int) -> str:
    return ", ".join(f"{family.title} {family.default_size[axis]}" for family in families)


def _family_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for each option an installed family's training adapter declares (``--expert``, ``--guidance``),
    and ``--family-option KEY=VALUE`` for any of them; the values become ``TrainingConfig.family_options``."""
    group = parser.add_argument_group("family options", "settings of the training adapter of the families named")
    for option in declared_family_options().values():
        titles = ", ".join(get_family(family).title for family in option.families)
        settings: dict[str, object] = {"default": argparse.SUPPRESS, "help": f"{option.help} [{titles}]"}
        if option.type is bool:
            settings["action"] = "store_true"
        elif option.choices is not None:
            settings["choices"] = option.choices
        else:
            settings["type"] = _option_type(option.type)
            settings["metavar"] = option.type.__name__.upper()
        group.add_argument("--" + option.name.replace("_", "-"), dest=_FLAG_DEST + option.name, **settings)
    group.add_argument(
        "--family-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any family option by name, e.g. expert=high_noise (repeatable)",
    )


_FLAG_DEST = "family_flag:"  # not a TrainingConfig field, so config_from_args collects these apart


def _option_type(kind: type) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return parse_option_value(kind, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _family_options(args: argparse.Namespace) -> dict[str, object]:
    """The family options given as flags and as ``--family-option KEY=VALUE``."""
    given = {key.removeprefix(_FLAG_DEST): value for key, value in vars(args).items() if key.startswith(_FLAG_DEST)}
    declared = declared_family_options()
    for pair in args.family_option:
        key, equals, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not equals or key not in declared:
            known = ", ".join(declared) or "none"
            raise UsageError(f"--family-option {pair}: give KEY=VALUE with a KEY an installed family takes: {known}")
        if key in given:
            raise UsageError(f"--family-option {pair}: {key} is given twice")
        try:
            given[key] = parse_option_value(declared[key].type, text)
        except ValueError as error:
            raise UsageError(f"--family-option {key}: {error}") from None
    return given


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a LoRA or fine-tune a model",
        description="Train a LoRA (peft adapters on the DiT) or fine-tune whole components with flow matching.",
        epilog=EXAMPLES,
        **formatter(),
    )
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    lora = modes.add_parser("lora", help="train a LoRA", epilog=EXAMPLES, **formatter())
    _common(lora)
    lora.add_argument("--rank", type=types.positive_int, default=16)
    lora.add_argument("--alpha", type=types.positive_float, default=None, help="default: the rank")
    lora.add_argument("--targets", nargs="+", default=None, help="module name patterns (default: the family's)")
    lora.add_argument("--lora-format", choices=["comfyui", "kohya", "diffusers"], default="comfyui")
    lora.add_argument(
        "--trigger-word", action="append", default=[], dest="trigger_words", metavar="WORD", type=types.utf8_text
    )
    lora.add_argument("--fp8-frozen", action="store_true", help="frozen weights stored in FP8")
    lora.add_argument("--stream-frozen", action="store_true", help="frozen weights stream from CPU RAM (ds-vram)")
    lora.add_argument(
        "--vram-limit", type=types.non_negative_float, default=None, help="GiB of frozen weights kept on the device"
    )
    full = modes.add_parser("full", help="fine-tune whole components", epilog=EXAMPLES, **formatter())
    _common(full)
    full.add_argument("--trainable", nargs="+", default=["dit"], help="components to train (default: dit)")


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The ``TrainingConfig`` the arguments describe; a bad value is a usage error naming its option."""
    if not args.data.exists():
        raise UsageError(f"--data {args.data}: no such folder or file")
    sizes, spelling = (
        {"height": args.height, "width": args.width, "frames": args.num_frames},
        {"frames": "--num-frames"},
    )
    entry = types.preset_entry(args.model, sizes)
    types.check_size(entry, sizes, spelling)
    types.check_size_fits(entry, sizes, args.device, options=spelling)
    values = {name: getattr(args, name) for name in {f.name for f in fields(TrainingConfig)} if hasattr(args, name)}
    values["progress_bar"] = not args.no_progress
    values["family_options"] = _family_options(args)
    if args.learning_rate is None:
        values["learning_rate"] = 1e-4 if args.mode == "lora" else 1e-5
    if args.mode == "lora":
        values.update(lora_rank=args.rank, lora_alpha=float(args.alpha or args.rank), lora_targets=args.targets)
    else:
        values["trainable"] = tuple(args.trainable)
    try:
        return TrainingConfig(**values)
    except ValueError as error:  # names the TrainingConfig field; its option is the same name with dashes
        raise UsageError(str(error)) from error


def run(args: argparse.Namespace) -> int:
    """Train; ds_train's messages (memory estimate, progress) go to stderr so stdout holds only the weights path."""
    config = config_from_args(args)
    with contextlib.redirect_stdout(sys.stderr):
        result = train(config)
    print(result.weights_path if result.weights_path is not None else result.output)
    return 130 if result.interrupted else 0
