"""A sampling step that produces NaN or Inf stops with an error naming the step and the likely cause, and nothing is
saved, instead of a black image written as if all went well."""

from __future__ import annotations

import pytest
import torch

from ds_pipelines import FluxImagePipeline
from tests.apps.test_cli import TINY, kohya_lora, run_main


@pytest.fixture(scope="module")
def pipe(flux_files):
    return FluxImagePipeline.from_pretrained(
        flux_files.bfl_repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


def test_a_non_finite_step_names_the_step_and_the_causes(pipe, monkeypatch):
    calls = []
    predict = FluxImagePipeline.predict

    def poisoned(model, latents, sigmas, conditions):
        calls.append(1)
        velocity = predict(model, latents, sigmas, conditions)
        return velocity * float("nan") if len(calls) == 2 else velocity

    monkeypatch.setattr(FluxImagePipeline, "predict", staticmethod(poisoned))
    with pytest.raises(FloatingPointError, match=r"sampling step 2 of 3 produced non-finite latents") as error:
        pipe("a cat", height=64, width=64, num_inference_steps=3, seed=0)
    assert "float32 overflow" in str(error.value) and "nothing was saved" in str(error.value)
    assert len(calls) == 2  # it stopped at once


def test_finite_sampling_is_untouched(pipe):
    image = pipe("a cat", height=64, width=64, num_inference_steps=2, seed=0)
    assert image.size == (64, 64)


def test_the_cli_stops_on_a_lora_that_blows_up_and_writes_nothing(flux_files, tmp_path, capsys):
    lora = kohya_lora(tmp_path / "huge.safetensors")
    output = tmp_path / "black.png"
    model = ("--model", flux_files.bfl_repo, "--prompt", "a cat", "-o", output, *TINY)
    code, _, err = run_main(capsys, "generate", *model, "--lora", f"{lora}:1e30")
    assert code == 1, err
    assert "sampling step 1 of 1 produced non-finite latents" in err and "a broken LoRA (huge)" in err, err
    assert not output.exists() and not list(tmp_path.glob(".black.png*"))
