"""inspect_checkpoint: a data report and a printable table, from headers only."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from ds_loader import inspect_checkpoint


def test_report_of_a_single_file(tiny, files, registered):
    report = inspect_checkpoint(files.original_bf16)
    (entry,) = report.entries
    assert (entry.family, entry.model, entry.format) == ("tiny", "dit", "original")
    assert entry.config == tiny.TinyConfig()
    assert entry.parameter_count == sum(v.numel() for v in files.state.values())
    assert entry.dtypes == {"bfloat16": entry.parameter_count - 4, "int64": 4}
    table = str(report).splitlines()
    assert table[0] == str(files.original_bf16)
    assert table[1].split() == ["component", "family", "model", "format", "params", "size", "dtypes", "config"]
    assert set(table[2]) == {"-", " "}
    assert table[3].split()[:5] == ["-", "tiny", "dit", "original", f"{entry.parameter_count / 1e3:.2f}K"]
    assert "bfloat16 100%, int64 0%" in table[3] and "dim=32, depth=2, in_channels=8, tokens=4" in table[3]


def test_report_of_a_repository_and_an_unknown_file(tiny, files, registered, tmp_path):
    report = inspect_checkpoint(files.repo)
    assert [(e.component, e.family, e.model, e.format) for e in report.entries] == [
        ("transformer", "tiny", "dit", "diffusers"),
        ("vae", "tiny", "vae", "original"),
    ]
    assert "transformer" in str(report) and "channels=8" in str(report)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"encoder.0.weight": torch.zeros(2, 2)}, unknown)
    report = inspect_checkpoint(unknown, specs=[tiny.dit_spec, tiny.vae_spec])
    (entry,) = report.entries
    assert entry.family is None and entry.note.startswith("closest: tiny.vae: no encoder.0.weight")
    assert "closest: tiny.vae" in str(report)
    (nothing,) = inspect_checkpoint(unknown, specs=[]).entries
    assert nothing.note == "no model specs registered"
