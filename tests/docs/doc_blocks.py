"""Fenced code blocks of the MyST pages under docs/, with the ``% doc-test:`` marker on the line before each."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
CHECKED_LANGUAGES = ("python", "bash")
_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARK = re.compile(r"^%\s*doc-test:\s*(?P<action>run|skip)\b\s*[,:]?\s*(?P<reason>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its page, the line its code starts on, language, code and marker (None: unmarked)."""

    page: Path
    line: int
    language: str
    code: str
    action: str | None
    reason: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(DOCS.parent)}:{self.line}"


def pages() -> list[Path]:
    return sorted(path for path in DOCS.rglob("*.md") if "_build" not in path.parts)


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` whose info string is a plain language (not a ``{directive}``)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        match = _FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        fence, info = match["fence"], match["info"].strip()
        end = index + 1
        while end < len(lines) and not (lines[end].startswith(fence) and not lines[end].strip(fence[0]).strip()):
            end += 1
        language = info.split()[0] if info and not info.startswith("{") else ""
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        mark = _MARK.match(previous.strip())
        found.append(
            Block(
                page,
                index + 2,
                language,
                "\n".join(lines[index + 1 : end]) + "\n",
                mark["action"] if mark else None,
                mark["reason"].strip() if mark else "",
            )
        )
        index = end + 1
    return found


def checked_blocks() -> list[Block]:
    return [block for page in pages() for block in blocks(page) if block.language in CHECKED_LANGUAGES]


def commands(block: Block) -> list[list[str]]:
    """A bash block's commands as argument lists, without ``uv run``; each must be a ``diffsynth`` command."""
    result = []
    for text in block.code.replace("\\\n", " ").splitlines():
        argv = shlex.split(text, comments=True)
        if not argv:
            continue
        if argv[:2] == ["uv", "run"]:
            argv = argv[2:]
        if argv[:1] != ["diffsynth"]:
            raise ValueError(f"{block.where}: a runnable bash block may hold only diffsynth commands: {text!r}")
        result.append(argv[1:])
    return result
