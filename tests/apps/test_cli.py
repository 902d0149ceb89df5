"""`diffsynth` as a user runs it: a subprocess, on tiny weights, with its exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

TINY = ["--height", "64", "--width", "64", "--steps", "1", "--device", "cpu", "--dtype", "fp32"]


def diffsynth(*args: str, cwd=None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ds_cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=environment,
    )


@pytest.mark.slow
def test_generate_writes_pngs_with_metadata_and_never_overwrites(flux_files, tmp_path):
    output = tmp_path / "cat.png"
    first = diffsynth("generate", "--model", flux_files.bfl_repo, "--prompt", "the cat", "-o", output, *TINY)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(output)
    with Image.open(output) as image:
        assert image.size == (64, 64)
        assert json.loads(image.info["diffsynth"])["prompt"] == "the cat"
    again = diffsynth(
        "generate",
        "--model",
        flux_files.bfl_repo,
        "--prompt",
        "the cat",
        "-o",
        output,
        "--count",
        "2",
        "--seed",
        "4",
        "--vram-limit",
        "0",
        "--fp8",
        *TINY,
    )
    assert again.returncode == 0, again.stderr
    written = again.stdout.split()
    assert [os.path.basename(p) for p in written] == ["cat-0000.png", "cat-0001.png"]
    seeds = [json.loads(Image.open(path).info["diffsynth"])["seed"] for path in written]
    assert seeds == [4, 5]
    third = diffsynth("generate", "--model", flux_files.bfl_repo, "--prompt", "the cat", "-o", output, *TINY)
    assert third.stdout.strip().endswith("cat-1.png")  # cat.png exists: a new name, nothing overwritten


def test_errors_are_one_line_with_exit_codes(flux_files, tmp_path):
    bad_size = diffsynth(
        "generate",
        "--model",
        flux_files.bfl_repo,
        "--prompt",
        "x",
        "-o",
        tmp_path / "x.png",
        *TINY[:3],
        "72",
        *TINY[4:],
    )
    assert bad_size.returncode == 1
    assert bad_size.stderr.strip().splitlines()[-1] == (
        "diffsynth: error: width=72 is not a multiple of 16; the nearest valid sizes are 64 and 80"
    )
    assert "Traceback" not in bad_size.stderr
    missing = diffsynth("generate", "--model", tmp_path / "nowhere", "--prompt", "x", *TINY)
    assert missing.returncode == 1 and "diffsynth: error:" in missing.stderr
    usage = diffsynth("generate", "--prompt", "x")
    assert usage.returncode == 2 and "--model" in usage.stderr
    not_png = diffsynth("generate", "--model", flux_files.bfl_repo, "--prompt", "x", "-o", tmp_path / "x.jpg")
    assert not_png.returncode == 2 and "use a .png name" in not_png.stderr
    debug = diffsynth(
        "--debug",
        "generate",
        "--model",
        flux_files.bfl_repo,
        "--prompt",
        "x",
        "-o",
        tmp_path / "y.png",
        *TINY[:3],
        "72",
        *TINY[4:],
    )
    assert "Traceback" in debug.stderr


def test_models_inspect_prints_the_detection(flux_files):
    result = diffsynth("models", "inspect", flux_files.bfl_repo / "flux1-dev.safetensors")
    assert result.returncode == 0, result.stderr
    assert all(word in result.stdout for word in ("flux", "dit", "bfl", "depth_single_blocks=2"))
    help_text = diffsynth("generate", "--help")
    assert help_text.returncode == 0 and "examples:" in help_text.stdout
