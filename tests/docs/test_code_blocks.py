"""Code in the docs runs: every python and bash block is marked run or skip (with a reason), and the runnable
ones execute, page by page, against tiny local models."""

from __future__ import annotations

import dataclasses
import re

import pytest

from tests.docs.doc_blocks import DOCS, Block, blocks, checked_blocks, commands, pages

RUNNABLE_PAGES = [page for page in pages() if any(block.action == "run" for block in blocks(page))]


def test_every_code_block_is_marked_run_or_skip_with_a_reason():
    problems = []
    for block in checked_blocks():
        if block.action is None:
            problems.append(f"{block.where}: no '% doc-test: run' or '% doc-test: skip, <reason>' line before it")
        elif block.action == "skip" and len(block.reason) < 10:
            problems.append(f"{block.where}: a skipped block needs its reason (got {block.reason!r})")
    assert not problems, "\n".join(problems)
    assert any(block.action == "run" for block in checked_blocks())


def test_runnable_bash_blocks_hold_only_diffsynth_commands():
    for block in checked_blocks():
        if block.action == "run" and block.language == "bash":
            assert commands(block), f"{block.where}: an empty runnable block"


def _run_python(block: Block, namespace: dict) -> None:
    try:
        exec(compile(block.code, block.where, "exec"), namespace)
    except Exception as error:
        raise AssertionError(f"{block.where}: the python block failed: {type(error).__name__}: {error}") from error


def _run_bash(block: Block, capsys: pytest.CaptureFixture) -> None:
    from ds_cli.main import main

    for argv in commands(block):
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, f"{block.where}: diffsynth {' '.join(argv)} exited {code}: {captured.err.strip()[-500:]}"


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda page: str(page.relative_to(DOCS)))
def test_page_code_runs(page, docs_sandbox, capsys):
    namespace: dict = {"__name__": "__main__"}
    for block in blocks(page):
        if block.action != "run":
            continue
        if block.language == "python":
            _run_python(block, namespace)
        elif block.language == "bash":
            _run_bash(block, capsys)


def test_vram_guide_lists_every_vram_config_field():
    from ds_vram import VRAMConfig

    text = (DOCS / "vram.md").read_text(encoding="utf-8")
    documented = re.findall(r"^\| `(\w+)` \|", text, flags=re.MULTILINE)
    assert documented == [field.name for field in dataclasses.fields(VRAMConfig)]


def _table_rows(page: str) -> dict[str, list[str]]:
    """The rows of a page's Markdown tables whose first cell is a code span, by that name."""
    rows = {}
    for line in (DOCS / page).read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) > 1:
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def _number(value: float | None) -> str:
    return "none" if value is None else f"{value:g}"


def test_flux_preset_table_matches_the_presets():
    from ds_models_flux import PRESETS

    rows = _table_rows("families/flux.md")
    assert set(PRESETS) <= set(rows), f"docs/families/flux.md lacks presets {set(PRESETS) - set(rows)}"
    for name, preset in PRESETS.items():
        repository, steps, guidance, t5_tokens = rows[name][:4]
        if preset.files["dit"].folder is None:  # a released model, not the shipped demo
            assert repository == f"`{preset.model_id}`", name
        assert (steps, t5_tokens) == (str(preset.steps), str(preset.t5_sequence_length)), name
        assert guidance.startswith(_number(preset.guidance)), name


def test_wan_preset_table_matches_the_presets():
    from ds_models_wan.presets import PRESETS

    rows = _table_rows("families/wan.md")
    assert set(PRESETS) <= set(rows), f"docs/families/wan.md lacks presets {set(PRESETS) - set(rows)}"
    for name, preset in PRESETS.items():
        repository, _mode, size, frames_fps, steps, shift, cfg = rows[name][:7]
        assert repository == f"`{preset.model_id}`", name
        assert size == f"{preset.width}x{preset.height}", name
        assert frames_fps == f"{preset.num_frames} / {preset.fps}", name
        assert (steps, shift) == (str(preset.steps), _number(preset.sigma_shift)), name
        scales = [preset.cfg_scale_high_noise, preset.cfg_scale] if preset.cfg_scale_high_noise else [preset.cfg_scale]
        expected = " / ".join(dict.fromkeys(_number(scale) for scale in scales))
        assert cfg == expected, name
