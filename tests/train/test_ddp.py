"""``accelerate launch --num_processes 2 --cpu``: DDP trains a LoRA with no find_unused_parameters flag from the user
and writes one checkpoint (the main process writes; both processes' random states are in it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from safetensors import safe_open

SCRIPT = """
import sys
from ds_train import TrainingConfig, train

model, data, output = sys.argv[1:4]
result = train(TrainingConfig(
    model=model, data=data, output=output, mode="lora", lora_rank=2, steps=2, batch_size=2, checkpoint_every=2,
    height=32, width=32, mixed_precision="no", device="cpu", progress_bar=False, tensorboard=False,
))
print("LOSSES", result.losses)
"""


@pytest.mark.slow
def test_two_process_lora_run_writes_one_checkpoint(flux_files, shapes_data, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    output = tmp_path / "ddp"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"]
    # accelerate 1.x runs `--cpu` with one process unless MPI is set up; `--multi_gpu` is its torchrun launcher,
    # which on a machine without CUDA (and with ds_train's device="cpu") gives DDP over gloo on the CPU.
    launch += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    completed = subprocess.run(
        [*launch, str(script), str(flux_files.repo), str(shapes_data), str(output)],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "on 2 process(es)" in completed.stdout
    checkpoints = sorted(p.name for p in (output / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"]
    assert {"rng-0.safetensors", "rng-1.safetensors"} <= {
        p.name for p in (output / "checkpoints" / checkpoints[0]).iterdir()
    }
    with safe_open(output / "lora.safetensors", "pt") as file:
        assert any(key.endswith("lora_down.weight") for key in file.keys())  # noqa: SIM118
