"""``diffsynth``: argument parsing and printing only; everything else lives in the packages.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args) -> int``. Exit codes: 0 success, 1 a
runtime error (its message on stderr naming what to fix; ``--debug`` shows the traceback), 2 a usage error.
Results go to stdout, progress bars and messages to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Callable

from ds_cli.common import UsageError, formatter, printable, style

EXAMPLES = """examples:
  diffsynth generate --prompt "a handwritten digit 7" -o seven.png        # the built-in demo model, no download
  diffsynth generate --model flux.1-dev --prompt "a lighthouse at dawn" -o lighthouse.png --vram-limit 6 --fp8
  diffsynth generate --model wan2.1-t2v-1.3b --prompt "waves at night" -o waves.mp4 --frames 33
  diffsynth models list
  diffsynth models download flux.1-schnell
  diffsynth models inspect flux1-dev.safetensors
  diffsynth lora inspect style.safetensors
  diffsynth vram --model flux.1-dev --gpu-memory 8
  diffsynth train lora --model flux.1-dev --data ./photos --output runs/style --steps 1000 --rank 16

Run "diffsynth COMMAND --help" for each command's options and examples.
"""

COMMANDS = ("generate", "models", "lora", "vram", "train")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    """The parser and each command's ``run`` function."""
    parser = argparse.ArgumentParser(
        prog="diffsynth",
        description="DiffSynth Studio: generate images and videos, train LoRAs, inspect models and LoRA files.",
        epilog=EXAMPLES,
        **formatter(),
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors and debug logs")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners = {}
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ds_cli.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"ds_cli.{name}":
                raise
            continue  # a command whose module is not installed (train arrives with ds-train)
        module.add_parser(subparsers)
        runners[name] = module.run
    return parser, runners


LISTED = 10  # entries of a listing error (broken rows, missing keys) shown before "... and N more"
_MORE = re.compile(r"^(\s*)\.\.\. and (\d+) more")


def error_text(error: BaseException) -> str:
    """The whole message of ``error`` for the terminal: every line, a list beyond ``LISTED`` entries shortened
    with a count of the rest, and control characters escaped (messages quote key names and metadata of files)."""
    text = str(error).strip()
    if isinstance(error, KeyError) and text.startswith(("'", '"')):
        text = text[1:-1]  # KeyError quotes its message
    if not text:
        return type(error).__name__
    first, *entries = text.split("\n")  # only real newlines: splitlines would also break at \x0c, \x1c, \x85
    hidden = 0
    if entries and (more := _MORE.match(entries[-1])):
        hidden = int(more.group(2))
        entries.pop()
    if len(entries) > LISTED:
        hidden += len(entries) - LISTED
        entries = entries[:LISTED]
    if hidden:
        indent = entries[-1][: len(entries[-1]) - len(entries[-1].lstrip())] if entries else "  "
        entries.append(f"{indent}... and {hidden} more")
    return "\n".join(printable(line, keep="\t") for line in [first, *entries])


class _PrintableFormatter(logging.Formatter):
    """Log records quote file names and keys: escape their control characters like everything else we print."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), keep="\n")


def _escaped_warnings() -> Callable[..., None]:
    """A ``warnings.showwarning`` that escapes the message, then shows it as the one it replaces would."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:
        show(printable(message, keep="\n"), category, filename, lineno, file, line)

    return showwarning


def main(argv: list[str] | None = None) -> int:
    parser, runners = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, handlers=[handler])
    prefix = style("diffsynth: error:", "31", sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _escaped_warnings()
            return int(runners[args.command](args) or 0)
    except UsageError as error:
        parser.print_usage(sys.stderr)
        print(f"{prefix} {error_text(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffsynth: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the message for the user; the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"{prefix} {error_text(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
