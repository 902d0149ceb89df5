"""Measured memory: the catalog prefers a CUDA measurement of the same preset, setting and size over its estimate
and says which figures are which; the benchmark that records them runs (tiny, on the CPU, in-process)."""

from __future__ import annotations

import json
import runpy
import warnings
from pathlib import Path

import pytest
import torch

from ds_cli.main import main as diffsynth
from ds_pipelines import MemoryNeed, catalog, estimate_memory, get_model_entry, memory_need, suggest_vram

GIB = 1024**3
BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "memory.py"
H100 = "NVIDIA H100 80GB HBM3"


def record(**fields: object) -> dict[str, object]:
    base = {"preset": "flux.1-dev", "setting": "offload", "height": 1024, "width": 1024, "frames": 1}
    base |= {"device": "cuda", "gpu": H100, "status": "ok", "peak_bytes": 25 * GIB, "date": "2026-01-02"}
    return base | fields


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """Write a measurements file and point the catalog at it (each test has its own path, so no stale cache)."""
    path = tmp_path / "measured_memory.json"
    monkeypatch.setenv(catalog.MEASURED_MEMORY_ENV, str(path))

    def write(*records: dict[str, object], text: str | None = None) -> Path:
        path.write_text(text if text is not None else json.dumps({"measurements": list(records)}))
        return path

    return write


@pytest.fixture(scope="module")
def benchmark() -> dict[str, object]:
    return runpy.run_path(str(BENCHMARK))


def test_the_shipped_file_holds_no_measurements_yet(monkeypatch):
    monkeypatch.delenv(catalog.MEASURED_MEMORY_ENV, raising=False)
    assert catalog.measured_memory_file() == catalog.MEASURED_MEMORY_FILE
    assert json.loads(catalog.MEASURED_MEMORY_FILE.read_text()) == {"measurements": []}


def test_a_cuda_measurement_replaces_the_estimate_for_that_size_only(measured):
    dev = get_model_entry("flux.1-dev")
    rule = catalog.rule_estimate(dev, "offload", None, None, None)
    measured(record())
    need = memory_need(dev, "offload")
    assert need == MemoryNeed(25 * GIB, True, f"measured on {H100} (2026-01-02)")
    assert estimate_memory(dev, "offload") == 25 * GIB != rule
    assert memory_need(dev, "offload", 1024, 1024) == need  # the default size, spelt out
    other_size = memory_need(dev, "offload", 512, 512)
    assert not other_size.measured and other_size.source == "estimated"
    assert other_size.bytes == catalog.rule_estimate(dev, "offload", 512, 512, None)
    assert not memory_need(dev, "fp8").measured  # another setting
    assert not memory_need(get_model_entry("flux.1-schnell"), "offload").measured  # another preset


def test_two_gpus_give_the_larger_and_cpu_tiny_and_oom_records_are_ignored(measured):
    dev = get_model_entry("flux.1-dev")
    measured(
        record(),
        record(gpu="NVIDIA H200", peak_bytes=26 * GIB),
        record(setting="fp8", device="cpu", gpu="cpu", peak_bytes=0),
        record(setting="stream", tiny=True, peak_bytes=1),
        record(setting="resident", status="oom", peak_bytes=None),
    )
    assert memory_need(dev, "offload") == MemoryNeed(26 * GIB, True, "measured on NVIDIA H200 (2026-01-02)")
    for setting in ("fp8", "stream", "resident"):
        assert not memory_need(dev, setting).measured


@pytest.mark.parametrize("text", ["{not json", '{"measurements": {}}', '{"measurements": [{"preset": 1}]}', "[]"])
def test_a_malformed_file_warns_naming_it_and_falls_back(measured, text):
    path = measured(text=text)
    dev = get_model_entry("flux.1-dev")
    with pytest.warns(UserWarning, match=f"{path}: malformed measured-memory file"):
        need = memory_need(dev, "offload")
    assert not need.measured and need.bytes == catalog.rule_estimate(dev, "offload", None, None, None)


def test_an_absent_or_empty_file_means_estimates_without_a_warning(measured, tmp_path, monkeypatch):
    dev = get_model_entry("flux.1-dev")
    measured(text="")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not memory_need(dev, "resident").measured
        monkeypatch.setenv(catalog.MEASURED_MEMORY_ENV, str(tmp_path / "missing.json"))
        assert not memory_need(dev, "resident").measured


def test_suggestions_say_whether_their_numbers_were_measured(measured):
    dev = get_model_entry("flux.1-dev")
    assert suggest_vram(dev, 80).reason.endswith("(estimated)")
    measured(record(setting="resident", peak_bytes=40 * GIB))
    suggestion = suggest_vram(dev, 80)
    assert suggestion.setting == "resident" and suggestion.estimate_bytes == 40 * GIB
    assert f"measured on {H100}" in suggestion.reason
    assert suggest_vram(dev, 39).reason.endswith("(estimated)")  # offload is not measured


def test_the_cli_marks_estimated_figures(measured, capsys):
    assert diffsynth(["models", "list", "--family", "flux.1"]) == 0
    out, err = capsys.readouterr()
    dev = next(line.split() for line in out.splitlines() if line.startswith("flux.1-dev "))
    assert all(cell.startswith("~") for cell in dev[6::2])  # resident, offload, fp8, stream: "~12.3 GiB"
    assert "~ estimated: no GPU measurement recorded yet; run benchmarks/memory.py on a GPU" in err

    measured(*(record(setting=s, peak_bytes=(i + 20) * GIB) for i, s in enumerate(catalog.MEMORY_SETTINGS)))
    assert diffsynth(["models", "list", "--family", "flux.1"]) == 0
    out, err = capsys.readouterr()
    dev = next(line.split() for line in out.splitlines() if line.startswith("flux.1-dev "))
    assert dev[6:] == ["20.0", "GiB", "21.0", "GiB", "22.0", "GiB", "23.0", "GiB"]
    assert "~ estimated" in err  # the other presets are still estimates

    assert diffsynth(["vram", "--model", "flux.1-dev", "--gpu-memory", "24", "--height", "512"]) == 0
    out, _ = capsys.readouterr()
    assert "(estimated)" in out and "~" in out and "~ estimated: no GPU measurement" in out
    assert diffsynth(["vram", "--model", "flux.1-dev", "--gpu-memory", "24"]) == 0
    out, _ = capsys.readouterr()
    assert f"setting    resident: everything fits: 20.0 GiB of 24.0 GiB (measured on {H100}" in out
    assert "~" not in out and "estimated" not in out


def test_the_benchmark_runs_tiny_on_the_cpu_and_the_catalog_ignores_it(benchmark, tmp_path, monkeypatch, capsys):
    output = tmp_path / "measured.json"
    argv = ["--device", "cpu", "--tiny", "--models", "flux.1-dev", "--settings", "resident", "stream"]
    assert benchmark["main"]([*argv, "--output", str(output)]) == 0
    records = json.loads(output.read_text())["measurements"]
    assert [(r["preset"], r["setting"], r["device"], r["status"]) for r in records] == [
        ("flux.1-dev", "resident", "cpu", "ok"),
        ("flux.1-dev", "stream", "cpu", "ok"),
    ]
    assert {"text_encoder", "text_encoder_2", "dit", "vae"} == set(records[0]["components"])
    assert all(r["tiny"] and r["gpu"] == "cpu" and r["torch"] == torch.__version__ for r in records)

    benchmark["write_records"](output, [{**records[0], "peak_bytes": 7}])  # same key: replaced, not added
    merged = json.loads(output.read_text())["measurements"]
    assert len(merged) == 2 and merged[0]["peak_bytes"] == 7
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed into place

    monkeypatch.setenv(catalog.MEASURED_MEMORY_ENV, str(output))
    dev = get_model_entry("flux.1-dev")
    size = (records[0]["height"], records[0]["width"])
    assert not memory_need(dev, "resident", *size).measured  # CPU runs measure nothing


def test_the_benchmark_plans_without_running_and_needs_cuda_to_measure(benchmark, tmp_path, capsys):
    output = tmp_path / "plan.json"
    assert benchmark["main"](["--dry-run", "--models", "wan2.2-t2v-a14b", "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "wan2.2-t2v-a14b        resident 720x1280x81" in out and "dit_low_noise" in out
    assert not output.exists()
    assert benchmark["main"](["--device", "cpu", "--output", str(output)]) == 2  # real configs on the CPU: no
    assert "--tiny goes with --device cpu" in capsys.readouterr().err
    assert benchmark["main"](["--dry-run", "--models", "flux.9"]) == 2
    if not torch.cuda.is_available():
        assert benchmark["main"](["--output", str(output)]) == 2
        assert "no CUDA GPU here" in capsys.readouterr().err
        assert not output.exists()


@pytest.mark.parametrize("preset", ["flux.1-dev", "wan2.1-t2v-1.3b"])
def test_the_released_plans_run_on_meta_at_the_default_size(benchmark, preset):
    """What a GPU session runs, minus the memory: the family's released components and its pipeline's
    ``run_component`` inputs agree (the VAE decode of 81 Wan frames is left out; tiled on meta it costs half a
    minute)."""
    entry = get_model_entry(preset)
    plan = benchmark["build_plan"](preset, entry.height, entry.width, entry.frames, False)
    meta = torch.device("meta")
    with benchmark["_bf16_on"](meta):
        modules = plan.build()
    assert set(modules) == {c.name for c in plan.components} == {c.name for p in plan.phases for c in p.components}
    for component in (c for c in plan.components if (entry.kind, c.role) != ("video", "vae")):
        module = modules[component.name].eval()
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, component.name
        with torch.inference_mode():
            plan.run(component, module, meta)


def test_phases_come_from_the_pipeline_steps_and_one_architecture_is_measured_once(benchmark):
    """Wan 2.2 A14B: the preset's two experts are the pipeline's ``dit`` and ``dit2``, each its own step, measured
    once under one key; FLUX.1's CLIP and T5 share the prompt step; a tiny plan has the released one's names."""
    plan = benchmark["build_plan"]("wan2.2-t2v-a14b", 720, 1280, 81, False)
    roles = {c.name: (c.role, c.key) for c in plan.components}
    assert roles["dit_high_noise"] == ("dit", "dit") and roles["dit_low_noise"] == ("dit2", "dit")
    phases = {p.name: [c.name for c in p.components] for p in plan.phases}
    assert phases["denoise"] == ["dit_high_noise"] and phases["denoise_low_noise"] == ["dit_low_noise"]
    assert phases["encode_prompt"] == ["text_encoder"] and "image_encoder" not in str(phases)
    flux = benchmark["build_plan"]("flux.1-dev", 1024, 1024, 1, False)
    assert [c.name for p in flux.phases for c in p.components if p.name == "encode_prompt"] == [
        "text_encoder",
        "text_encoder_2",
    ]
    for preset in ("flux.1-fill-dev", "wan2.1-flf2v-14b-720p", "wan2.2-ti2v-5b"):
        released = benchmark["build_plan"](preset, 64, 64, 5, False)
        tiny = benchmark["build_plan"](preset, 64, 64, 5, True)
        assert [(c.name, c.role, c.key) for c in tiny.components] == [
            (c.name, c.role, c.key) for c in released.components
        ]
        assert [p.name for p in tiny.phases] == [p.name for p in released.phases]
