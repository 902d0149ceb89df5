"""train(): full and LoRA runs on the tiny FLUX.1 repository write loadable weights, logs and checkpoints."""

from __future__ import annotations

import torch

from ds_pipelines import FluxImagePipeline
from ds_train import TrainingConfig, train


def _config(flux_files, data, output, **overrides):
    values = dict(
        model=flux_files.repo,
        data=data,
        output=output,
        steps=3,
        height=32,
        width=32,
        mixed_precision="no",
        device="cpu",
        checkpoint_every=2,
        lora_rank=4,
        learning_rate=1e-2,
        tensorboard=False,
    )
    return TrainingConfig(**{**values, **overrides})


def test_full_run_writes_a_loadable_dit(flux_files, shapes_data, tmp_path):
    result = train(_config(flux_files, shapes_data, tmp_path / "full", mode="full"))
    assert result.steps == 3 and len(result.losses) == 3
    assert (tmp_path / "full" / "log.csv").is_file() and (tmp_path / "full" / "loss.png").is_file()
    assert (tmp_path / "full" / "checkpoints" / "step-000002" / "state.json").is_file()
    pipe = FluxImagePipeline.from_pretrained(
        flux_files.repo, model_configs={"dit": result.weights_path}, device="cpu", torch_dtype=torch.float32
    )
    assert not torch.equal(pipe.dit.img_in.weight, flux_files.transformer.x_embedder.weight)


def test_lora_streamed_and_checkpointed_match_plain(flux_files, shapes_data, tmp_path):
    plain = train(_config(flux_files, shapes_data, tmp_path / "plain", checkpoint_every=0))
    assert plain.weights_path.name == "lora.safetensors" and plain.weights_path.is_file()
    streamed = train(
        _config(
            flux_files,
            shapes_data,
            tmp_path / "stream",
            checkpoint_every=0,
            stream_frozen=True,
            gradient_checkpointing=True,
            offload_activations=True,
        )
    )
    assert streamed.losses == plain.losses
