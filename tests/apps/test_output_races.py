"""Two `diffsynth` runs started together on one output name: each keeps its own file and prints the name it really
wrote; two trainings on one folder: the second is refused, naming the first. Real processes, held at a barrier at
the moment that used to race (after choosing a name, before writing it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.apps.test_cli import TINY, kohya_lora

RUNNER = '''
import functools, pathlib, sys, time

barrier, me, count, where = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]


def wait():
    """Hold until every racer is here (at most 4 minutes)."""
    barrier.mkdir(exist_ok=True)
    (barrier / me).touch()
    deadline = time.time() + 240
    while len(list(barrier.iterdir())) < count and time.time() < deadline:
        time.sleep(0.01)


if where == "generate":  # the image is made and its name was chosen; now write it
    import ds_pipelines

    cls = ds_pipelines.FluxImagePipeline
    original_call = cls.__call__

    @functools.wraps(original_call)
    def call(self, *args, **kwargs):
        result = original_call(self, *args, **kwargs)
        wait()
        return result

    cls.__call__ = call
elif where == "merge":  # the output name was checked; now merge and write
    from ds_pipelines import lora_io

    original_merge = lora_io.merge_lora_files

    @functools.wraps(original_merge)
    def merge(*args, **kwargs):
        wait()
        return original_merge(*args, **kwargs)

    lora_io.merge_lora_files = merge
elif where == "train":  # start together; whoever gets the folder keeps it while reading its data
    import ds_train.data

    original_init = ds_train.data.ImageDataset.__init__

    @functools.wraps(original_init)
    def init(self, *args, **kwargs):
        time.sleep(8)
        original_init(self, *args, **kwargs)

    ds_train.data.ImageDataset.__init__ = init
    import ds_cli.train  # noqa: F401  (imported before the barrier, so both start main() at once)

from ds_cli.main import main

if where == "train":
    wait()
sys.exit(main(sys.argv[5:]))
'''


def race(tmp_path: Path, where: str, *commands: list[object]) -> list[subprocess.CompletedProcess]:
    """Run the ``diffsynth`` commands at once, each held at the barrier ``where``; their results, in order."""
    runner = tmp_path / "racer.py"
    runner.write_text(RUNNER)
    environment = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
    barrier = tmp_path / f"barrier-{where}"
    processes = [
        subprocess.Popen(
            [sys.executable, runner, barrier, str(i), str(len(commands)), where, *map(str, command)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            cwd=tmp_path,
        )
        for i, command in enumerate(commands)
    ]
    results = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        result = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        result.pid = process.pid
        results.append(result)
    return results


@pytest.mark.slow
def test_two_generations_to_one_name_keep_both_images(flux_files, tmp_path):
    output = tmp_path / "o.png"
    common = ["generate", "--model", flux_files.bfl_repo, "--prompt", "the cat", "-o", output, *TINY]
    first, second = race(tmp_path, "generate", [*common, "--seed", "1"], [*common, "--seed", "2"])
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    printed = [first.stdout.strip(), second.stdout.strip()]
    assert sorted(printed) == [str(tmp_path / "o-1.png"), str(output)]
    for path, seed in zip(printed, (1, 2), strict=True):  # each process printed the file holding its own image
        with Image.open(path) as image:
            assert json.loads(image.info["diffsynth"])["seed"] == seed
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["o-1.png", "o.png"]
    assert not list(tmp_path.glob(".*.partial"))


@pytest.mark.slow
def test_two_merges_to_one_name_keep_both_files(tmp_path):
    a, b = kohya_lora(tmp_path / "a.safetensors"), kohya_lora(tmp_path / "b.safetensors")
    output = tmp_path / "m.safetensors"
    first, second = race(
        tmp_path,
        "merge",
        ["lora", "merge", a, b, "--weights", "1", "0.5", "-o", output],
        ["lora", "merge", a, b, "--weights", "0.5", "1", "-o", output],
    )
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    printed = sorted([first.stdout.strip(), second.stdout.strip()])
    assert printed == [str(tmp_path / "m-1.safetensors"), str(output)]
    assert all(Path(path).stat().st_size > 0 for path in printed)


@pytest.mark.slow
def test_two_trainings_in_one_folder_the_second_is_refused(flux_files, tmp_path):
    from tests.train.conftest import write_dataset

    data = tmp_path / "data"
    write_dataset(data)
    output = tmp_path / "run"
    command = [
        "train", "lora", "--model", flux_files.repo, "--data", data, "--output", output, "--steps", "2",
        "--height", "32", "--width", "32", "--mixed-precision", "no", "--device", "cpu", "--no-progress",
        "--checkpoint-every", "0", "--rank", "4",
    ]  # fmt: skip
    results = race(tmp_path, "train", command, command)
    codes = sorted(result.returncode for result in results)
    assert codes == [0, 1], [result.stderr for result in results]
    winner = next(result for result in results if result.returncode == 0)
    loser = next(result for result in results if result.returncode == 1)
    assert winner.stdout.strip() == str(output / "lora.safetensors")
    error = loser.stderr.strip().splitlines()[-1]
    assert error.startswith(f"diffsynth: error: {output} is in use by another run: pid {winner.pid} on ")
    assert f"on {socket.gethostname()}, started " in error and str(output / ".ds-train.lock") in error
    assert len((output / "log.csv").read_text().splitlines()) == 3  # one run's header and 2 steps, not both runs'
