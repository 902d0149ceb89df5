"""``diffsynth train``: the arguments become a TrainingConfig, the run writes its weights, errors are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from ds_cli.main import main


def run_main(capsys, *args: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 40x40 images, each with a same-name .txt caption."""
    folder = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a noisy square number {i}", encoding="utf-8")
    return folder


SMALL = ("--steps", "2", "--height", "32", "--width", "32", "--mixed-precision", "no", "--device", "cpu")


def test_train_lora_writes_the_adapter_and_prints_its_path(flux_files, captioned, tmp_path, capsys):
    output = tmp_path / "run"
    common = ("--model", flux_files.repo, "--data", captioned, "--output", output, *SMALL, "--no-progress")
    code, out, err = run_main(capsys, "train", "lora", *common, "--rank", "4", "--lora-format", "kohya")
    assert code == 0, err
    assert out.strip() == str(output / "lora.safetensors")  # stdout holds only the result path
    assert "estimated peak memory" in err  # ds_train's estimate, printed before the first step, on stderr
    path = out.strip()
    with safe_open(path, "pt") as file:
        keys = list(file.keys())
        metadata = file.metadata()
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] in ("4", "4.0")


def test_train_full_writes_the_dit(flux_files, captioned, tmp_path, capsys):
    output = tmp_path / "full"
    common = ("--model", flux_files.repo, "--data", captioned, "--output", output, *SMALL, "--no-progress")
    code, out, err = run_main(capsys, "train", "full", *common, "--trainable", "dit")
    assert code == 0, err
    assert out.strip() == str(output / "dit.safetensors")
    with safe_open(output / "dit.safetensors", "pt") as file:
        assert any(key.startswith("double_blocks.0.") for key in file.keys())  # noqa: SIM118 (safe_open has no __iter__)


def test_train_errors_name_the_option(flux_files, tmp_path, capsys):
    base = ("train", "lora", "--model", flux_files.repo, "--output", tmp_path / "x")
    code, _, err = run_main(capsys, *base, "--data", tmp_path / "missing")
    assert code == 2 and "--data" in err and str(tmp_path / "missing") in err
    assert len(err.strip().splitlines()) == 2  # the usage line, then one line naming what to fix
    code, _, err = run_main(capsys, *base, "--data", tmp_path, "--height", "30")
    assert code == 2 and "height=30" in err
    code, _, err = run_main(capsys, "train", "lora", "--model", "m")
    assert code == 2 and "--data" in err


def test_train_help_runs_as_a_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ds_cli", "train", "lora", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--rank" in result.stdout and "diffsynth train lora --model" in result.stdout


def test_train_wan_lora_on_clips(wan_files, tmp_path, capsys):
    from tests.train.conftest import write_clips

    clips = write_clips(tmp_path / "clips")
    output = tmp_path / "wan"
    common = ("--model", wan_files.t2v, "--data", clips, "--output", output, *SMALL, "--no-progress")
    code, out, err = run_main(
        capsys, "train", "lora", *common, "--num-frames", "5", "--rank", "4", "--lora-format", "kohya"
    )
    assert code == 0, err
    assert "4 videos, 1 images" in err and "estimated peak memory" in err
    with safe_open(out.strip(), "pt") as file:
        keys = list(file.keys())
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in keys
    code, _, err = run_main(capsys, "train", "lora", *common, "--expert", "low_noise")
    last = err.strip().splitlines()[-1]  # after the dataset's line, one line naming what to fix
    assert code == 1 and last.startswith("diffsynth: error: expert='low_noise' needs a Wan2.2 A14B pair")
