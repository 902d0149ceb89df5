"""The docs build with warnings as errors: broken references, bad MyST, docstrings docutils cannot read, a CLI
whose parsers fail to build, and a package whose public API fails to import all fail here."""

from __future__ import annotations

import pytest

from tests.docs.doc_blocks import DOCS


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The mapping interface for autodoc options")  # Sphinx 9's own napoleon
def test_docs_build_with_warnings_as_errors(tmp_path, monkeypatch, capsys):
    # In this process (the Sphinx API, as `sphinx-build` runs it): the packages autodoc imports are loaded already.
    from sphinx.cmd.build import build_main

    monkeypatch.setenv("NO_COLOR", "1")
    output = tmp_path / "html"
    status = build_main(
        ["-W", "--keep-going", "-q", "-b", "html", "-d", str(tmp_path / "doctrees"), str(DOCS), str(output)]
    )
    assert status == 0, capsys.readouterr().err[-4000:]
    api = (output / "api.html").read_text(encoding="utf-8")
    for name in ("ds_vram.VRAMConfig", "ds_loader.load_model", "ds_pipelines.FluxImagePipeline"):
        assert f'id="{name}"' in api, f"the API reference lacks {name}"
    cli = (output / "cli.html").read_text(encoding="utf-8")
    assert "diffsynth generate" in cli and "--vram-limit" in cli
    assert (output / "families" / "flux.html").is_file()


def test_docstring_entries_become_lists_and_other_text_stays():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docstring_entries", DOCS / "_ext" / "docstring_entries.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = [
        "Load a model.",
        "",
        "device, torch_dtype: where and in what dtype; integer",
        "    tensors keep theirs.",
        "vram: a ``VRAMConfig``.",
        "Returns the model.",
    ]
    assert module.entries_to_bullets(lines) == [
        "Load a model.",
        "",
        "- **device, torch_dtype**: where and in what dtype; integer",
        "  tensors keep theirs.",
        "- **vram**: a ``VRAMConfig``.",
        "",
        "Returns the model.",
        "",
    ]
