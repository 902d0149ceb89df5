"""ds_train on the tiny Z-Image repository: the adapter's choices, LoRA steps through the CLI and the Python API, and a
LoRA file that means the same in our pipeline and in diffusers' ZImagePipeline (``load_lora_weights``)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ds_pipelines import FlowMatchScheduler
from ds_pipelines.z_image import ZImagePipeline
from ds_train import TrainingConfig, family_of_model, get_adapter, train
from ds_train.z_image import ZImageTrainingAdapter
from tests.pipelines.z_image_fixtures import diffusers_pipeline, z_image_files  # noqa: F401  (session fixture)

BASE = dict(
    height=32,
    width=32,
    mixed_precision="no",
    device="cpu",
    seed=0,
    progress_bar=False,
    tensorboard=False,
    checkpoint_every=0,
)
SIZE = 32


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def pipe(z_image_files) -> ZImagePipeline:  # noqa: F811
    return ZImagePipeline.from_pretrained(
        z_image_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


def test_adapter_targets_blocks_prompts_and_sigmas(z_image_files, pipe):  # noqa: F811
    assert family_of_model(z_image_files.repo) == "z-image"
    adapter = get_adapter("z-image")
    assert isinstance(adapter, ZImageTrainingAdapter)
    assert adapter.default_timestep_sampling == "uniform" and adapter.default_loss_weighting == "bell"
    # The LoRA targets: attention q/k/v/out and the SwiGLU of the main layers, nothing in the refiners.
    import fnmatch

    names = [name for name, module in pipe.dit.named_modules() if isinstance(module, torch.nn.Linear)]
    targeted = {name for name in names if any(fnmatch.fnmatch(name, p) for p in adapter.default_lora_targets)}
    layers = len(pipe.dit.layers)
    assert len(targeted) == 7 * layers and all(name.startswith("layers.") for name in targeted)
    assert adapter.blocks(pipe.dit) == list(pipe.dit.layers)
    # Prompts of any length stack: padded to 512 tokens, the mask marks the prompt's own.
    short, long = adapter.encode_prompts(pipe, ["a cat"]), adapter.encode_prompts(pipe, ["a red square on grey"])
    assert short["text"].shape == long["text"].shape == (1, 512, 32)
    assert short["text_mask"].dtype == torch.bool and 0 < short["text_mask"].sum() < long["text_mask"].sum()
    # Padding changes nothing the model sees: the same prediction with and without it.
    encoded = pipe.encode_prompt("a cat")
    latents, sigmas = torch.randn(1, 16, 4, 4), torch.tensor([0.6])
    with torch.no_grad():
        plain = ZImagePipeline.predict(pipe.dit, latents, sigmas, {"text": encoded.text, "text_mask": encoded.mask})
        padded = ZImagePipeline.predict(pipe.dit, latents, sigmas, short)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    # Sigmas: uniform, shifted by the schedule's 3 (the median of shift_sigmas(U) is 3 * 0.5 / (1 + 2 * 0.5) = 0.75).
    drawn = adapter.sample_sigmas(pipe, torch.zeros(4096, 16, 4, 4), torch.Generator().manual_seed(0), "uniform")
    assert abs(float(drawn.median()) - 0.75) < 0.02
    assert isinstance(adapter.scheduler(pipe), FlowMatchScheduler)
    with pytest.raises(ValueError, match="height=40 is not a multiple of 16"):
        adapter.check(pipe, 40, 32, None)


@pytest.fixture(scope="module")
def trained(z_image_files, shapes_data, tmp_path_factory):  # noqa: F811
    output = tmp_path_factory.mktemp("z-image-lora")
    run = TrainingConfig(
        **BASE,
        model=z_image_files.repo,
        data=shapes_data,
        output=output,
        steps=4,
        learning_rate=5e-2,
        lora_rank=4,
        lora_alpha=2.0,
        batch_size=2,
        cache=True,
    )
    return train(run)


@pytest.mark.slow
def test_lora_loads_with_the_same_effect_here_and_in_diffusers(z_image_files, trained, tmp_path):  # noqa: F811
    assert len(trained.losses) == 4 and all(np.isfinite(trained.losses))
    path = trained.weights_path
    with safe_open(path, "pt") as file:
        keys = set(file.keys())
    assert "diffusion_model.layers.1.attention.to_out.0.lora_down.weight" in keys
    assert "diffusion_model.layers.0.feed_forward.w3.lora_up.weight" in keys
    assert not any("refiner" in key for key in keys)

    from ds_train import convert_lora_file

    diffusers_path = convert_lora_file(path, tmp_path / "lora-diffusers.safetensors", to="diffusers")
    with safe_open(diffusers_path, "pt") as file:
        assert any(key.startswith("transformer.layers.0.attention.to_q.") for key in file.keys())  # noqa: SIM118

    noise = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    options = dict(height=SIZE, width=SIZE, num_inference_steps=3)
    ours_pipe = ZImagePipeline.from_pretrained(
        z_image_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )
    before = np.asarray(ours_pipe("a red square", noise=noise, **options)).astype(np.int16)
    ours_pipe.load_lora(path)
    ours = np.asarray(ours_pipe("a red square", noise=noise, **options)).astype(np.int16)
    assert np.abs(ours - before).mean() > 1  # the LoRA changes the image

    # diffusers' own pipeline on a copy of the same weights, with the diffusers-format file.
    files = copy.copy(z_image_files)
    files.transformer = copy.deepcopy(z_image_files.transformer)
    theirs_pipe = diffusers_pipeline(files)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs_pipe.load_lora_weights(str(diffusers_path), adapter_name="trained")
    with torch.no_grad():
        images = theirs_pipe(
            "a red square", latents=noise.clone(), guidance_scale=0.0, output_type="pt", **options
        ).images
    theirs = (images[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()


def test_cli_trains_a_lora_on_the_model_folder(z_image_files, shapes_data, tmp_path, capsys):  # noqa: F811
    from tests.apps.test_cli_train import run_main

    output = tmp_path / "run"
    code, out, err = run_main(
        capsys,
        "train",
        "lora",
        "--model",
        z_image_files.repo,
        "--data",
        shapes_data,
        "--output",
        output,
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--rank",
        "4",
        "--mixed-precision",
        "no",
        "--device",
        "cpu",
        "--no-progress",
    )
    assert code == 0, err
    assert out.strip() == str(output / "lora.safetensors")
    with safe_open(out.strip(), "pt") as file:
        metadata = file.metadata()
        assert any(".layers.0.attention.to_q." in key for key in file.keys())  # noqa: SIM118
    assert metadata["ss_network_dim"] == "4"
