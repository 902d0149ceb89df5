"""What every subcommand shares: usage errors, colour that respects NO_COLOR, tables, paths that never overwrite."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

GIB = 1024**3
# C0 controls, DEL, C1 controls (ESC and CSI start terminal escape sequences) and lone surrogates (bytes that were
# not UTF-8, which a UTF-8 terminal stream cannot even encode).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class UsageError(Exception):
    """A bad combination of arguments: exit code 2, like argparse's own errors."""


def printable(text: object, keep: str = "") -> str:
    """``text`` safe to print: control characters and undecodable bytes escaped (``\\x1b``, ``\\n``, ``\\udcff``)
    so that text from a file (LoRA metadata, key names, prompts) cannot move the cursor, retitle or clear the
    terminal. ``keep`` lists characters left as they are, such as ``"\\n"`` for text the CLI itself laid out."""

    def escape(match: re.Match) -> str:
        char = match.group()
        if char in keep:
            return char
        code = ord(char)
        return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")

    return _UNPRINTABLE.sub(escape, str(text))


def formatter() -> dict[str, object]:
    """Keyword arguments for a parser whose epilog (the examples) keeps its line breaks."""
    return {"formatter_class": argparse.RawDescriptionHelpFormatter}


def use_color(stream: TextIO) -> bool:
    """Colour only on a terminal, never with NO_COLOR set (https://no-color.org); FORCE_COLOR forces it on."""
    if os.environ.get("NO_COLOR"):
        return False
    if os.environ.get("FORCE_COLOR"):
        return True
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


def style(text: str, code: str, stream: TextIO | None = None) -> str:
    """``text`` in an ANSI style (``"1"`` bold, ``"31"`` red, ``"2"`` dim) when ``stream`` shows colour."""
    return f"\033[{code}m{text}\033[0m" if use_color(stream or sys.stdout) else text


def table(rows: Sequence[Sequence[object]], right: Sequence[int] = ()) -> str:
    """Rows as aligned columns; the first row is the header (bold where colour is on), numbers right-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]

    def line(row: list[str]) -> str:
        parts = [
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    header = style(line(cells[0]), "1")
    return "\n".join([header, line(["-" * w for w in widths])] + [line(row) for row in cells[1:]])


def gib(count: int | None) -> str:
    return "?" if count is None else f"{count / GIB:.1f} GiB"


def free_paths(output: Path, count: int, overwrite: bool) -> list[Path]:
    """``count`` output paths: ``name.png`` first, then ``name-1.png``, ``name-2.png``, ... skipping files that
    exist, so nothing is overwritten unless ``overwrite`` (then the same names are reused)."""
    result: list[Path] = []
    number = 0
    while len(result) < count:
        candidate = output if number == 0 else output.with_name(f"{output.stem}-{number}{output.suffix}")
        number += 1
        if overwrite or not candidate.exists():
            result.append(candidate)
    return result
