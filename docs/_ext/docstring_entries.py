"""Render the project's docstring convention as reStructuredText.

Our docstrings describe arguments and fields as plain ``name: text`` lines whose continuation lines are
indented (see ``ds_vram.VRAMConfig``); several names may share an entry (``device, torch_dtype: ...``). Read as
reStructuredText that is a definition list broken by unindents, which docutils warns about. Before autodoc parses
a docstring, this turns each paragraph made only of such entries into a bullet list, ends indented blocks with the
blank line docutils expects, and leaves everything else as written.
"""

from __future__ import annotations

import re

from sphinx.application import Sphinx

ENTRY = re.compile(r"(?P<names>[A-Za-z_][\w.]*(?:\s*[,/]\s*[A-Za-z_][\w.]*)*)\s*:\s+(?P<text>\S.*)")


def _paragraphs(lines: list[str]) -> list[list[str]]:
    """Blocks of lines split at blank lines, where an unindented line that is not an entry follows indented ones
    (docutils wants a blank line there to end the definition list or block quote), and where plain text follows
    a run of entries."""
    paragraphs: list[list[str]] = [[]]
    for line in lines:
        if not line.strip():
            paragraphs.append([])
            continue
        current = paragraphs[-1]
        plain = not line[:1].isspace() and not ENTRY.fullmatch(line)
        if current and plain and (current[-1][:1].isspace() or _is_entry_list(current)):
            paragraphs.append(current := [])
        current.append(line)
    return [paragraph for paragraph in paragraphs if paragraph]


def _is_entry_list(paragraph: list[str]) -> bool:
    first = paragraph[0]
    if first[:1].isspace() or not ENTRY.fullmatch(first):
        return False
    return all(line[:1].isspace() or ENTRY.fullmatch(line) for line in paragraph)


def entries_to_bullets(lines: list[str]) -> list[str]:
    """The docstring's lines with ``name: text`` paragraphs written as ``- **name**: text`` bullet lists."""
    result: list[str] = []
    for paragraph in _paragraphs(lines):
        if _is_entry_list(paragraph):
            for line in paragraph:
                match = None if line[:1].isspace() else ENTRY.fullmatch(line)
                if match:
                    result.append(f"- **{match['names']}**: {match['text']}")
                else:
                    result.append("  " + line.strip())
        else:
            result.extend(paragraph)
        result.append("")
    return result


def _process(app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]) -> None:
    lines[:] = entries_to_bullets(lines)


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("autodoc-process-docstring", _process, priority=600)  # after napoleon (500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
