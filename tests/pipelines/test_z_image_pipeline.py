"""ZImagePipeline against diffusers' ZImagePipeline on the same tiny components (CFG off and on, truncated and
normalised), its schedule against diffusers' scheduler, its guards, its preset defaults, and the CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ds_pipelines import FlowMatchScheduler, save_image
from ds_pipelines.z_image import ZImagePipeline, cfg_active, warn_fp8_turbo
from ds_vram import VRAMConfig
from tests.pipelines.z_image_fixtures import diffusers_pipeline, z_image_files  # noqa: F401  (session fixture)

SIZE = 64  # pixels: 8x8 latents, 16 image tokens
PROMPT = "the cat and the hat"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def pipe(z_image_files) -> ZImagePipeline:  # noqa: F811
    return ZImagePipeline.from_pretrained(
        z_image_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


@pytest.fixture(scope="module")
def diffusers_pipe(z_image_files):  # noqa: F811
    theirs = diffusers_pipeline(z_image_files)
    theirs.set_progress_bar_config(disable=True)
    return theirs


def noise_for(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def reference(diffusers_pipe, prompt: str, noise: torch.Tensor, **kwargs) -> np.ndarray:
    with torch.no_grad():
        images = diffusers_pipe(
            prompt, height=SIZE, width=SIZE, latents=noise.clone(), output_type="pt", **kwargs
        ).images
    return (images[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()


# ---------------------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize(("steps", "shift"), [(1, None), (8, None), (50, None), (8, 6.0)])
def test_sigmas_equal_diffusers_scheduler(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift or 3.0)
    # diffusers' ZImagePipeline passes these sigmas (and a mu its static-shift scheduler ignores).
    theirs.set_timesteps(steps, sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), mu=0.5)
    ours = FlowMatchScheduler("z-image")
    ours.set_timesteps(steps, sigma_shift=shift)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=1e-6)
    # The DiT's own time, 1 - sigma, as diffusers computes it from its timesteps.
    torch.testing.assert_close(1 - ours.timesteps, (1000 - theirs.timesteps) / 1000, rtol=0, atol=1e-6)


def test_cfg_truncation_turns_guidance_off_past_the_threshold():
    sigmas = FlowMatchScheduler("z-image")
    sigmas.set_timesteps(8)
    normalised = [1 - float(s) for s in sigmas.timesteps]
    active = [cfg_active(float(s), 0.5) for s in sigmas.timesteps]
    assert active == [t <= 0.5 for t in normalised] and any(active) and not all(active)
    assert all(cfg_active(float(s), 1.0) for s in sigmas.timesteps)
    assert all(cfg_active(float(s), 1.5) for s in sigmas.timesteps)  # above 1: never truncated


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.slow
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({"cfg_scale": 1.0}, {"guidance_scale": 0.0}),
        ({"cfg_scale": 3.0}, {"guidance_scale": 2.0}),
        ({"cfg_scale": 3.0, "cfg_truncation": 0.2}, {"guidance_scale": 2.0, "cfg_truncation": 0.2}),
        ({"cfg_scale": 4.0, "cfg_normalization": True}, {"guidance_scale": 3.0, "cfg_normalization": True}),
        (
            {"cfg_scale": 4.0, "cfg_normalization": 1.1, "cfg_truncation": 0.3},
            {"guidance_scale": 3.0, "cfg_normalization": 1.1, "cfg_truncation": 0.3},
        ),
    ],
    ids=["cfg-off", "cfg-on", "truncated", "normalised", "both"],
)
def test_matches_diffusers_z_image_pipeline(pipe, diffusers_pipe, ours, theirs):
    noise = noise_for()
    negative = "blurry"
    steps = 4
    image = pipe(
        PROMPT, negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps, noise=noise, **ours
    )
    expected = reference(diffusers_pipe, PROMPT, noise, negative_prompt=negative, num_inference_steps=steps, **theirs)
    difference = np.abs(pixels(image) - expected)
    assert difference.max() <= 1, difference.max()
    # The comparison can tell prompts apart.
    other = pipe(
        "a dog", negative_prompt=negative, height=SIZE, width=SIZE, num_inference_steps=steps, noise=noise, **ours
    )
    assert np.abs(pixels(other) - expected).mean() > 1


@pytest.mark.slow
def test_each_cfg_option_changes_the_image(pipe):
    def run(**options) -> np.ndarray:
        image = pipe(
            PROMPT, negative_prompt="blurry", height=SIZE, width=SIZE, num_inference_steps=4, seed=2, **options
        )
        return pixels(image)

    plain, guided = run(cfg_scale=1.0), run(cfg_scale=4.0)
    # 4 steps at shift 3 run at 1 - sigma = 0, 0.1, 0.25, 0.5: a truncation of 0.2 drops CFG from the last two.
    truncated, normalised = run(cfg_scale=4.0, cfg_truncation=0.2), run(cfg_scale=4.0, cfg_normalization=True)
    for name, image in (("guided", guided), ("truncated", truncated), ("normalised", normalised)):
        assert np.abs(image - plain).mean() > 0.5, name
    assert np.abs(truncated - guided).mean() > 0.5 and np.abs(normalised - guided).mean() > 0.5


def test_seed_noise_metadata_and_saved_file(pipe, tmp_path):
    first = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=2, seed=3)
    again = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=2, noise=noise_for(3))
    assert np.array_equal(pixels(first), pixels(again))  # seed -> CPU float32 noise, as documented
    metadata = json.loads(first.info["diffsynth"])
    assert metadata["seed"] == 3 and metadata["steps"] == 2 and metadata["size"] == f"{SIZE}x{SIZE}"
    assert metadata["cfg_scale"] == 1.0 and metadata["sigma_shift"] == 3.0 and metadata["cfg_truncation"] is None
    path = save_image(first, tmp_path / "cat.png")
    with Image.open(path) as saved:
        assert json.loads(saved.info["diffsynth"])["seed"] == 3


def test_defaults_are_turbo_and_a_call_uses_them(pipe):
    assert ZImagePipeline.default_options == {
        "cfg_scale": 1.0,
        "height": 1024,
        "width": 1024,
        "num_inference_steps": 8,
        "sigma_shift": 3.0,
    }
    calls = []
    original = ZImagePipeline.predict

    def counting(model, latents, sigmas, conditions):
        calls.append(float(sigmas[0]))
        return original(model, latents, sigmas, conditions)

    pipe.predict = counting  # the instance attribute shadows the staticmethod for this test
    try:
        image = pipe("the cat", height=SIZE, width=SIZE, seed=0)
    finally:
        del pipe.predict
    assert len(calls) == 8  # 8 steps, CFG off: one DiT call each
    assert json.loads(image.info["diffsynth"])["steps"] == 8


def test_image_to_image_starts_from_the_input(pipe):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    barely = pipe(
        "the cat", height=SIZE, width=SIZE, num_inference_steps=3, seed=1, input_image=source, denoising_strength=0.001
    )
    halfway = pipe(
        "the cat", height=SIZE, width=SIZE, num_inference_steps=3, seed=1, input_image=source, denoising_strength=0.6
    )
    from ds_pipelines import tensor_to_images

    round_trip = tensor_to_images(pipe.decode(pipe.encode_image(source)))[0]
    near = np.abs(pixels(barely) - pixels(round_trip)).mean()
    far = np.abs(pixels(halfway) - pixels(barely)).mean()
    assert near < 3 and far > 3 * near, (near, far)
    assert json.loads(halfway.info["diffsynth"])["denoising_strength"] == 0.6


# ---------------------------------------------------------------------------------------------- guards
@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(cfg_scale=0.5), ValueError, r"cfg_scale=0.5 must be a finite number >= 1 .*guidance_scale"),
        (dict(cfg_scale=float("nan")), ValueError, "cfg_scale=nan must be a finite number"),
        (dict(denoising_strength=0.5), ValueError, "denoising_strength != 1 needs an input_image"),
        (dict(height=72), ValueError, "height=72 is not a multiple of 16"),
        (dict(noise=torch.zeros(1, 16, 4, 4)), ValueError, r"noise has shape \(1, 16, 4, 4\); 64x64 needs"),
        (dict(edit_image=Image.new("RGB", (SIZE, SIZE))), ValueError, "edit_image needs Z-Image-Omni-Base"),
        (dict(cfg_truncation=-1.0), ValueError, "cfg_truncation=-1.0 must be a number >= 0"),
    ],
)
def test_guards(pipe, kwargs, error, message):
    arguments = dict(height=SIZE, width=SIZE, num_inference_steps=1, seed=0) | kwargs
    with pytest.raises(error, match=message):
        pipe("the cat", **arguments)


def test_a_prompt_over_512_tokens_is_an_error_that_says_so(pipe):
    long_prompt = " ".join(["the cat"] * 400)  # about 800 tokens with this tokenizer
    with pytest.raises(ValueError, match="512") as caught:
        pipe(long_prompt, height=SIZE, width=SIZE, num_inference_steps=1, seed=0)
    assert "token" in str(caught.value)
    with pytest.raises(ValueError, match="512"):  # the negative prompt is checked too, when CFG uses it
        pipe("the cat", negative_prompt=long_prompt, cfg_scale=2.0, height=SIZE, width=SIZE, num_inference_steps=1)


def test_fp8_storage_on_turbo_warns_once(z_image_files, tmp_path):  # noqa: F811
    turbo = tmp_path / "Z-Image-Turbo"
    turbo.symlink_to(z_image_files.repo, target_is_directory=True)
    fp8 = VRAMConfig(storage="cpu", storage_dtype="fp8", computation_device="cpu", computation_dtype=torch.float32)
    warn_fp8_turbo.cache_clear()
    options = dict(torch_dtype=torch.float32, device="cpu", progress_bar=False, vram={"dit": fp8})
    with pytest.warns(UserWarning, match="Z-Image-Turbo with FP8 weight storage .* degrades image quality"):
        loaded = ZImagePipeline.from_pretrained(turbo, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ZImagePipeline.from_pretrained(turbo, **options)  # once per process
        warn_fp8_turbo.cache_clear()
        ZImagePipeline.from_pretrained(z_image_files.repo, **options)  # not Turbo: no warning
        ZImagePipeline.from_pretrained(turbo, torch_dtype=torch.float32, device="cpu", progress_bar=False)  # bf16/fp32
    image = loaded("the cat", height=SIZE, width=SIZE, num_inference_steps=1, seed=0)  # still runs, as asked
    assert image.size == (SIZE, SIZE)
    warn_fp8_turbo.cache_clear()


# ---------------------------------------------------------------------------------------------- presets and the CLI
@pytest.fixture
def preset_models(z_image_files, tmp_path, monkeypatch):  # noqa: F811
    """The tiny repository where the presets look for Tongyi-MAI/Z-Image-Turbo and Tongyi-MAI/Z-Image."""
    base = tmp_path / "models"
    for repository in ("Z-Image-Turbo", "Z-Image"):
        (base / "Tongyi-MAI").mkdir(parents=True, exist_ok=True)
        (base / "Tongyi-MAI" / repository).symlink_to(z_image_files.repo, target_is_directory=True)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    return base


@pytest.mark.parametrize(("preset", "steps", "cfg_scale"), [("z-image-turbo", 8, 1.0), ("z-image", 50, 4.0)])
def test_presets_set_the_call_defaults(preset_models, preset, steps, cfg_scale):
    loaded = ZImagePipeline.from_pretrained(preset, torch_dtype=torch.float32, device="cpu", progress_bar=False)
    assert loaded.preset.name == preset
    defaults = loaded.sampling_defaults
    assert defaults["num_inference_steps"] == steps and defaults["cfg_scale"] == cfg_scale
    assert defaults.get("sigma_shift", 3.0) == 3.0
    image = loaded("the cat", height=SIZE, width=SIZE, num_inference_steps=1, seed=0)
    assert json.loads(image.info["diffsynth"])["cfg_scale"] == cfg_scale


def test_cli_generates_from_a_model_folder(z_image_files, capsys, tmp_path):  # noqa: F811
    from tests.apps.test_cli import run_main

    output = tmp_path / "zimage.png"
    code, _, err = run_main(
        capsys,
        "generate",
        "--model",
        z_image_files.repo,
        "--prompt",
        "the cat",
        "-o",
        output,
        "--height",
        SIZE,
        "--width",
        SIZE,
        "--steps",
        2,
        "--seed",
        5,
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 0, err
    with Image.open(output) as image:
        assert image.size == (SIZE, SIZE)
        recorded = json.loads(image.info["diffsynth"])
    assert recorded["steps"] == 2 and recorded["seed"] == 5 and recorded["cfg_scale"] == 1.0
