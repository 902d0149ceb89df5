"""``{diffsynth-cli}``: the help text of every ``diffsynth`` command, read from the CLI's argparse parsers at
build time, so the reference cannot drift from the code.

It walks ``ds_cli.main.build_parser()`` depth first: the top-level parser, then each subcommand (and their
subcommands), each under its own heading.
"""

from __future__ import annotations

import argparse
import os

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

WIDTH = "100"  # argparse wraps at $COLUMNS; fix it so the page does not depend on the build terminal


def walk(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """``(command line, parser)`` for ``parser`` and every subcommand below it, depth first."""
    found = [(parser.prog, parser)]
    for action in parser._actions:  # argparse has no public way to list subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found.extend(walk(child))
    return found


def help_text(parser: argparse.ArgumentParser) -> str:
    """The ``--help`` text as a user sees it in a plain terminal 100 columns wide."""
    settings = {"COLUMNS": WIDTH, "NO_COLOR": "1"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        return parser.format_help()
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def diffsynth_parser() -> argparse.ArgumentParser:
    """The CLI's top-level parser (``build_parser`` may also return the command runners beside it)."""
    from ds_cli.main import build_parser

    built = build_parser()
    return built[0] if isinstance(built, tuple) else built


class DiffsynthCli(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        result: list[nodes.Node] = []
        for command, parser in walk(diffsynth_parser()):
            section = nodes.section(ids=[nodes.make_id(command)])
            section += nodes.title(text=command)
            block = nodes.literal_block(text=help_text(parser).rstrip())
            block["language"] = "text"
            section += block
            result.append(section)
        return result


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("diffsynth-cli", DiffsynthCli)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
