"""Every file we write: complete or absent, never a clobbered name, the umask's mode, strict JSON metadata, and no
temporaries of killed runs left lying around."""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from ds_loader import files as files_module
from ds_loader.files import atomic_file, numbered_path, remove_leftovers, save_safetensors_atomic, write_bytes_atomic
from ds_pipelines import save_image, save_video
from ds_pipelines.lora_io import convert_lora_file, save_lora_file


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def lora_layers() -> dict:
    return {"double_blocks.0.img_attn.qkv": (torch.randn(2, 64), torch.randn(192, 2), 2.0)}


def test_every_writer_follows_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    image = save_image(Image.new("RGB", (8, 8)), tmp_path / "image.png", {"prompt": "p"})
    tensors = save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "tensors.safetensors", {"k": "v"})
    data = write_bytes_atomic(tmp_path / "data.json", b"{}")
    lora = save_lora_file(lora_layers(), tmp_path / "lora.safetensors", format="kohya")
    converted = convert_lora_file(lora, tmp_path / "converted.safetensors", to="comfyui")
    written = [image, tensors, data, lora, converted]
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        pass
    else:
        written.append(save_video([Image.new("RGB", (8, 8))] * 2, tmp_path / "video.mp4", fps=8, progress_bar=False))
    assert {path.name: mode(path) for path in written} == {path.name: expected for path in written}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)  # no temporaries left


def test_a_taken_name_is_never_replaced_without_overwrite(tmp_path):
    target = tmp_path / "o.png"
    target.write_bytes(b"mine")
    (tmp_path / "o-2.png").write_bytes(b"also mine")
    first = save_image(Image.new("RGB", (8, 8), "red"), target, {"seed": 1}, overwrite=False)
    second = save_image(Image.new("RGB", (8, 8), "red"), target, {"seed": 2}, overwrite=False)
    assert (first, second) == (tmp_path / "o-1.png", tmp_path / "o-3.png")
    assert target.read_bytes() == b"mine" and (tmp_path / "o-2.png").read_bytes() == b"also mine"
    replaced = save_image(Image.new("RGB", (8, 8)), target, {"seed": 3})  # the default replaces, as before
    assert replaced == target and json.loads(Image.open(target).info["diffsynth"])["seed"] == 3
    lora = save_lora_file(lora_layers(), tmp_path / "m.safetensors")
    again = save_lora_file(lora_layers(), lora, overwrite=False)
    assert again == tmp_path / "m-1.safetensors"
    assert numbered_path(tmp_path / "a.b.png", 4) == tmp_path / "a.b-4.png"


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_an_interrupted_write_leaves_nothing(tmp_path, error):
    for overwrite in (True, False):
        with pytest.raises(type(error)), atomic_file(tmp_path / "o.png", overwrite=overwrite) as pending:
            pending.temporary.write_bytes(b"half")
            raise error
    assert list(tmp_path.iterdir()) == []


def test_parallel_writers_to_one_name_each_keep_their_file(tmp_path):
    """Real processes, released together by a barrier after writing their temporaries: each claims its own name."""
    # ds_loader.files imports nothing heavy; loaded alone, four processes start in a blink instead of importing torch.
    script = (
        "import sys, time, pathlib, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('files', {files_module.__file__!r})\n"
        "files = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(files)\n"
        "atomic_file = files.atomic_file\n"
        "folder, me, count = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])\n"
        "with atomic_file(folder / 'o.png', overwrite=False) as pending:\n"
        "    pending.temporary.write_text(me)\n"
        "    (folder / 'barrier').mkdir(exist_ok=True)\n"
        "    (folder / 'barrier' / me).touch()\n"
        "    deadline = time.time() + 120\n"
        "    while len(list((folder / 'barrier').iterdir())) < count and time.time() < deadline:\n"
        "        time.sleep(0.005)\n"
        "print(pending.path)\n"
    )
    count = 4
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(i), str(count)], stdout=subprocess.PIPE, text=True
        )
        for i in range(count)
    ]
    outputs = [process.communicate(timeout=180)[0].strip() for process in processes]
    assert all(process.returncode == 0 for process in processes)
    names = sorted(os.path.basename(output) for output in outputs)
    assert names == ["o-1.png", "o-2.png", "o-3.png", "o.png"]
    assert sorted((tmp_path / name).read_text() for name in names) == ["0", "1", "2", "3"]  # nobody's file lost
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_non_finite_parameters_are_valid_json(tmp_path):
    parameters = {"prompt": "p", "cfg_scale": math.nan, "sigmas": [math.inf, -math.inf, 1.0], "seed": 3}
    path = save_image(Image.new("RGB", (8, 8)), tmp_path / "nan.png", parameters)

    def refuse(constant):
        raise ValueError(f"bare {constant} in the metadata")

    recorded = json.loads(Image.open(path).info["diffsynth"], parse_constant=refuse)
    assert recorded == {"prompt": "p", "cfg_scale": "nan", "sigmas": ["inf", "-inf", 1.0], "seed": 3}
    assert math.isnan(float(recorded["cfg_scale"]))


def test_temporaries_of_killed_runs_are_removed_and_reported(tmp_path, caplog):
    dead, old = dead_pid(), time.time() - 3600
    leftovers = [
        tmp_path / f".o.png.{dead}-0123abcd.partial",  # ours, its process gone
        tmp_path / f".o-1.png.{dead}-89abcdef.partial",  # a numbered sibling's
        tmp_path / ".o.png.k3j_9x2a.partial",  # an older release's mkstemp name
    ]
    kept = [
        tmp_path / f".o.png.{os.getpid()}-00000000.partial",  # a live process's (this one)
        tmp_path / f".other.png.{dead}-0123abcd.partial",  # another output's: not this write's business
        tmp_path / ".o.png.notes.txt",  # not our pattern
    ]
    for path in leftovers + kept:
        path.write_bytes(b"x")
        os.utime(path, (old, old))
    fresh = tmp_path / f".o.png.{dead}-fedcba98.partial"  # newer than this run: maybe a run on another machine
    fresh.write_bytes(b"x")
    os.utime(fresh, (time.time() + 60, time.time() + 60))
    with caplog.at_level(logging.WARNING, logger="ds_loader.files"):
        written = save_image(Image.new("RGB", (8, 8)), tmp_path / "o.png", {"prompt": "p"})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in [written, *kept, fresh])
    assert "removed 3 temporary file(s)" in caplog.text and leftovers[0].name in caplog.text
    assert remove_leftovers(tmp_path) == [tmp_path / f".other.png.{dead}-0123abcd.partial"]
