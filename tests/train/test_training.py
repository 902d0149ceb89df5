"""ds_train on the tiny FLUX.1: it learns, its LoRA files mean the same in our pipeline and in diffusers, a resumed
run is the uninterrupted run, caching changes nothing, and a failed checkpoint write loses nothing."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors import safe_open

from ds_pipelines import FluxImagePipeline
from ds_train import TrainingConfig, convert_lora_file, train
from ds_train import checkpoint as checkpoint_module
from tests.models.flux.test_dit import make_inputs, run_diffusers

BASE = dict(height=32, width=32, mixed_precision="no", device="cpu", seed=0, progress_bar=False, tensorboard=False)


def config(flux_files, data, output, **overrides) -> TrainingConfig:
    values = dict(BASE, model=flux_files.repo, data=data, output=output, checkpoint_every=0, batch_size=4)
    values.update(overrides)
    return TrainingConfig(**values)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.slow
def test_a_tiny_model_learns(flux_files, shapes_data, tmp_path):
    """Full fine-tuning of the DiT: the loss over the last steps falls well below the first steps' (the untrained
    model's), on 8 images of coloured shapes with the same seeded noise and timesteps stream."""
    result = train(
        config(flux_files, shapes_data, tmp_path / "run", mode="full", steps=120, learning_rate=1e-3, cache=True)
    )
    assert len(result.losses) == 120 and result.weights_path.name == "dit.safetensors"
    untrained, trained = mean(result.losses[:10]), mean(result.losses[-30:])
    assert trained < 0.6 * untrained, (untrained, trained)
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") == 121
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0


@pytest.fixture(scope="module")
def trained_lora(flux_files, shapes_data, tmp_path_factory):
    output = tmp_path_factory.mktemp("lora-run")
    run = config(flux_files, shapes_data, output, mode="lora", steps=4, learning_rate=5e-2, lora_rank=4)
    run.lora_alpha, run.trigger_words = 2.0, ("shapesxyz",)
    return train(run)


def dit_output(pipe: FluxImagePipeline, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return pipe.dit(**inputs)


def test_lora_export_loads_with_the_same_effect_here_and_in_diffusers(flux_files, trained_lora, tmp_path):
    path = trained_lora.weights_path
    with safe_open(path, "pt") as file:
        metadata = file.metadata()
        alphas = [file.get_tensor(key).item() for key in file.keys() if key.endswith(".alpha")]  # noqa: SIM118
    assert metadata["ss_network_dim"] == "4" and float(metadata["ss_network_alpha"]) == 2.0
    assert metadata["modelspec.trigger_phrase"] == "shapesxyz" and metadata["ss_steps"] == "4"
    assert alphas and set(alphas) == {2.0}

    pipe = FluxImagePipeline.from_pretrained(flux_files.repo, device="cpu", torch_dtype=torch.float32)
    inputs = make_inputs(pipe.dit.config)
    base = dit_output(pipe, inputs)
    pipe.load_lora(path)
    with_lora = dit_output(pipe, inputs)
    assert (with_lora - base).abs().max() > 1e-3  # the trained adapter does something

    diffusers_path = convert_lora_file(path, tmp_path / "lora-diffusers.safetensors", to="diffusers")
    pipe.clear_lora()
    torch.testing.assert_close(dit_output(pipe, inputs), base)
    pipe.load_lora(diffusers_path)
    torch.testing.assert_close(dit_output(pipe, inputs), with_lora, rtol=1e-5, atol=1e-5)

    theirs = copy.deepcopy(flux_files.transformer)
    with safe_open(diffusers_path, "pt") as file:
        state = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="trained")
    with torch.no_grad():
        torch.testing.assert_close(run_diffusers(theirs, inputs), with_lora, rtol=1e-4, atol=1e-4)


def test_resume_continues_the_uninterrupted_curve(flux_files, shapes_data, tmp_path):
    # Warm-up then constant: the schedule (and its state in the checkpoint) does not depend on the total steps,
    # so a 3-step run is the first half of the 6-step one.
    common = dict(mode="lora", learning_rate=1e-2, lora_rank=4, lr_warmup_steps=4)
    whole = train(config(flux_files, shapes_data, tmp_path / "whole", steps=6, **common))
    first = config(flux_files, shapes_data, tmp_path / "split", steps=6, checkpoint_every=3, **common)
    # Stop after step 3 as an interruption would: the run's own checkpoint at 3 is what resume reads.
    partial = train(dataclasses.replace(first, steps=3))
    assert partial.losses == whole.losses[:3]
    resumed = train(dataclasses.replace(first, resume=True))
    torch.testing.assert_close(torch.tensor(resumed.losses[-3:]), torch.tensor(whole.losses[3:]), rtol=1e-6, atol=0)
    with safe_open(whole.weights_path, "pt") as a, safe_open(resumed.weights_path, "pt") as b:
        for key in a.keys():  # noqa: SIM118
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-5, atol=1e-7)


def test_caching_then_training_equals_training_without_cache(flux_files, shapes_data, tmp_path):
    common = dict(mode="lora", steps=3, learning_rate=1e-2, lora_rank=4)
    plain = train(config(flux_files, shapes_data, tmp_path / "plain", **common))
    cached = train(config(flux_files, shapes_data, tmp_path / "cached", cache=True, **common))
    assert any((tmp_path / "cached" / "cache").glob("*.safetensors"))
    torch.testing.assert_close(torch.tensor(cached.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)


def test_a_failed_checkpoint_write_keeps_the_previous_one(flux_files, shapes_data, tmp_path, monkeypatch):
    run = config(flux_files, shapes_data, tmp_path / "run", mode="lora", steps=2, checkpoint_every=1, lora_rank=4)
    train(dataclasses.replace(run, steps=1))
    folder = tmp_path / "run" / "checkpoints"
    before = {p.name: p.read_bytes() for p in (folder / "step-000001").iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_safetensors_atomic", broken)
    with pytest.raises(OSError, match="disk full"):
        train(dataclasses.replace(run, resume=True))
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001"]  # no staging folder left behind
    assert {p.name: p.read_bytes() for p in (folder / "step-000001").iterdir()} == before


def test_two_runs_in_one_process_with_different_precisions(flux_files, shapes_data, tmp_path):
    """accelerate keeps process-wide state; a notebook that trains twice must not need a restart."""
    first = train(config(flux_files, shapes_data, tmp_path / "a", mode="lora", steps=1, mixed_precision="bf16"))
    second = train(config(flux_files, shapes_data, tmp_path / "b", mode="lora", steps=1, mixed_precision="no"))
    assert first.steps == second.steps == 1
