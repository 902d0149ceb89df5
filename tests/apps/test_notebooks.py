"""The notebooks: committed without outputs, valid Python, and the quickstart runs top to bottom under nbclient."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[2] / "apps" / "notebook" / "notebooks"
NAMES = ("quickstart.ipynb", "flux_low_vram.ipynb", "wan_text_to_video.ipynb", "lora_training.ipynb")


def test_notebooks_are_committed_clean_and_parse():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata.kernelspec.name == "python3", name
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs"
                ast.parse(cell.source)


def demo_model_ready() -> bool:
    from ds_models_flux import get_preset

    try:
        return all(Path(p).is_file() for p in get_preset("demo-digits").model_config("dit").resolve())
    except (ValueError, FileNotFoundError):
        return False


def run_notebook(name: str, folder: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    )
    client.execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def test_quickstart_runs_top_to_bottom(flux_files, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if not demo_model_ready():  # until the demo model ships, the same notebook on tiny random weights
        monkeypatch.setenv("DIFFSYNTH_NOTEBOOK_MODEL", str(flux_files.bfl_repo))
    notebook = run_notebook("quickstart.ipynb", tmp_path)
    shown = outputs(notebook)
    assert not [o for o in shown if o.output_type == "error"]
    grids = [
        o for o in shown if "text/html" in o.get("data", {}) and "grid-template-columns" in o["data"]["text/html"]
    ]
    assert len(grids) == 2 and grids[0]["data"]["text/html"].count("<img ") == 4
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in shown)  # the UI
    assert (tmp_path / "seven.png").is_file()


@pytest.mark.slow
def test_flux_low_vram_runs_on_tiny_weights(flux_files, tmp_path, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    (models / "flux").symlink_to(flux_files.bfl_repo)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DIFFSYNTH_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("DIFFSYNTH_NOTEBOOK_MODELS", str(models))
    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", "")  # the CPU path of the notebook
    notebook = run_notebook("flux_low_vram.ipynb", tmp_path)
    text = "".join(o.get("text", "") for o in outputs(notebook))
    assert "8 GiB: stream" in text and "streamed" in text


def tiny_models(tmp_path, monkeypatch, **folders) -> None:
    """The notebooks' DIFFSYNTH_NOTEBOOK_TINY switch: the same cells on tiny local weights, on the CPU."""
    models = tmp_path / "models"
    models.mkdir()
    for name, folder in folders.items():
        (models / name).symlink_to(folder)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DIFFSYNTH_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("DIFFSYNTH_NOTEBOOK_MODELS", str(models))
    monkeypatch.setitem(os.environ, "CUDA_VISIBLE_DEVICES", "")


@pytest.mark.slow
def test_wan_text_to_video_runs_on_tiny_weights(wan_files, tmp_path, monkeypatch):
    from ds_pipelines import load_video

    tiny_models(tmp_path, monkeypatch, wan=wan_files.t2v)
    notebook = run_notebook("wan_text_to_video.ipynb", tmp_path)
    assert not [o for o in outputs(notebook) if o.output_type == "error"]
    video = load_video(tmp_path / "waves.mp4")
    assert len(video) == 5 and video.fps == 16 and video.parameters["prompt"].startswith("waves")


@pytest.mark.slow
def test_lora_training_runs_on_tiny_weights(flux_files, tmp_path, monkeypatch):
    tiny_models(tmp_path, monkeypatch, flux=flux_files.bfl_repo)
    notebook = run_notebook("lora_training.ipynb", tmp_path)
    shown = outputs(notebook)
    assert not [o for o in shown if o.output_type == "error"]
    assert (tmp_path / "runs" / "digits-lora" / "lora.safetensors").is_file()
    html = [o.get("data", {}).get("text/html", "") for o in shown]
    grids = [text for text in html if "grid-template-columns" in text]
    assert len(grids) == 2 and grids[1].count("<img ") == 8
