"""One training run per output folder (a lock naming its holder, taken over when the holder died), leftovers of
killed runs removed, checkpoints readable under the umask, and a second Ctrl-C that does not lose the checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from ds_loader import files as files_module
from ds_loader.files import FolderLock, FolderLockedError
from ds_train import TrainingConfig, train
from ds_train import loop as loop_module

BASE = dict(height=32, width=32, mixed_precision="no", device="cpu", seed=0, progress_bar=False, tensorboard=False)


def config(flux_files, data, output, **overrides) -> TrainingConfig:
    values = dict(BASE, model=flux_files.repo, data=data, output=output, checkpoint_every=0, batch_size=4)
    values.update(mode="lora", lora_rank=4, steps=3)
    values.update(overrides)
    return TrainingConfig(**values)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(folder, pid, host=None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "host": host or socket.gethostname(), "started": "2024-01-01T00:00:00"}
    (folder / ".ds-train.lock").write_text(json.dumps(record))


def test_a_held_folder_is_refused_with_its_holder_named(tmp_path):
    with FolderLock(tmp_path / "run", ".ds-train.lock"):
        with pytest.raises(FolderLockedError) as error:
            FolderLock(tmp_path / "run", ".ds-train.lock").acquire()
        assert f"pid {os.getpid()} on {socket.gethostname()}" in str(error.value)
        assert "is in use by another run" in str(error.value)
    assert list((tmp_path / "run").iterdir()) == []  # released: the lock file is gone
    with FolderLock(tmp_path / "run"):  # and the folder can be taken again
        pass


def test_a_stale_lock_is_taken_over_but_not_a_live_or_foreign_one(tmp_path, caplog):
    write_lock(tmp_path / "dead", dead_pid())
    lock = FolderLock(tmp_path / "dead", ".ds-train.lock").acquire()
    assert lock.notice and "taking over the lock of a run that is gone" in lock.notice
    assert "taking over" in caplog.text
    assert json.loads((tmp_path / "dead" / ".ds-train.lock").read_text())["pid"] == os.getpid()
    lock.release()
    write_lock(tmp_path / "foreign", dead_pid(), host="another-machine")
    with pytest.raises(FolderLockedError, match=r"on another-machine.*if that run is over, delete"):
        FolderLock(tmp_path / "foreign", ".ds-train.lock").acquire()
    parent = os.getppid()  # alive, and holds no flock: a lock file that is not stale
    write_lock(tmp_path / "alive", parent)
    with pytest.raises(FolderLockedError, match=f"pid {parent}"):
        FolderLock(tmp_path / "alive", ".ds-train.lock").acquire()


def test_processes_racing_for_one_folder_get_it_one_at_a_time(tmp_path):
    """Real processes, released together: exactly one holds the lock; the others are refused naming it."""
    script = (
        "import sys, time, pathlib, importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('files', {files_module.__file__!r})\n"
        "files = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(files)\n"
        "root, me, count = pathlib.Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])\n"
        "(root / 'barrier').mkdir(exist_ok=True)\n"
        "(root / 'barrier' / me).touch()\n"
        "deadline = time.time() + 120\n"
        "while len(list((root / 'barrier').iterdir())) < count and time.time() < deadline:\n"
        "    time.sleep(0.002)\n"
        "try:\n"
        "    lock = files.FolderLock(root / 'run', '.ds-train.lock').acquire()\n"
        "except files.FolderLockedError as error:\n"
        "    print('refused:', error)\n"
        "    sys.exit(3)\n"
        "print('holder')\n"
        "time.sleep(3)\n"
        "lock.release()\n"
    )
    count = 4
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path), str(i), str(count)], stdout=subprocess.PIPE, text=True
        )
        for i in range(count)
    ]
    outputs = [process.communicate(timeout=180)[0] for process in processes]
    codes = sorted(process.returncode for process in processes)
    assert codes == [0, 3, 3, 3], outputs
    holder = next(p.pid for p in processes if p.returncode == 0)
    refusals = [out for out in outputs if out.startswith("refused")]
    assert all(f"pid {holder} on {socket.gethostname()}" in out for out in refusals), refusals


def test_training_refuses_a_held_output_folder(flux_files, shapes_data, tmp_path):
    output = tmp_path / "run"
    with FolderLock(output, ".ds-train.lock"), pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
        train(config(flux_files, shapes_data, output))
    assert not (output / "config.json").exists() and not (output / "log.csv").exists()


def test_a_run_after_a_crash_cleans_up_and_a_second_ctrl_c_keeps_the_checkpoint(
    flux_files, shapes_data, tmp_path, monkeypatch, capsys
):
    output = tmp_path / "run"
    write_lock(output, dead_pid())  # a run that was killed: its lock, a staging folder and a partial file
    (output / "checkpoints" / ".tmp-step-000001").mkdir(parents=True)
    (output / "checkpoints" / ".tmp-step-000001" / "rng-0.json").write_text("{}")
    partial = output / f".lora.safetensors.{dead_pid()}-0123abcd.partial"
    partial.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(partial, (old, old))

    calls = {"loss": 0}
    original_loss, original_finish = loop_module._Run._loss, loop_module.finish_checkpoint

    def loss(self, *args):
        calls["loss"] += 1
        if calls["loss"] == 3:  # Ctrl-C during step 3
            raise KeyboardInterrupt
        return original_loss(self, *args)

    def finish(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the impatient second Ctrl-C, while the checkpoint is written
        time.sleep(0.05)
        return original_finish(*args, **kwargs)

    monkeypatch.setattr(loop_module._Run, "_loss", loss)
    monkeypatch.setattr(loop_module, "finish_checkpoint", finish)
    previous = os.umask(0o027)
    try:
        result = train(config(flux_files, shapes_data, output, steps=5))
    finally:
        os.umask(previous)
    out = capsys.readouterr().out
    assert "taking over the lock of a run that is gone" in out
    assert "removed 2 leftover(s)" in out and "checkpoints/.tmp-step-000001" in out and partial.name in out
    assert "still saving the checkpoint and weights at step 2" in out
    assert result.interrupted and result.steps == 2
    checkpoint = output / "checkpoints" / "step-000002"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "optimizer.pt",
        "rng-0.json",
        "rng-0.safetensors",
        "state.json",
        "trainable.safetensors",
    ]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000002"]
    written = [*checkpoint.iterdir(), result.weights_path, output / "config.json", output / "log.csv"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {p.name: 0o640 for p in written}
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o750
    assert not partial.exists() and not (output / ".ds-train.lock").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
