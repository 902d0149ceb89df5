"""FluxImagePipeline against diffusers' FluxPipeline on the same tiny components, its guards, and its steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ds_models_core import patchify
from ds_pipelines import FluxImagePipeline, PipelineStepError, pipeline_step, save_image
from ds_vram import VRAMConfig, get_vram_handle

SIZE = 64  # pixels: 8x8 latents, 16 image tokens


@pytest.fixture(scope="module")
def pipe(flux_files) -> FluxImagePipeline:
    # The BFL layout (flux1-dev.safetensors, ae.safetensors at the root); diffusers parity below checks the weights.
    return FluxImagePipeline.from_pretrained(
        flux_files.bfl_repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


@pytest.fixture(scope="module")
def diffusers_pipe(flux_files):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=flux_files.autoencoder,
        transformer=flux_files.transformer,
        text_encoder=flux_files.clip,
        text_encoder_2=flux_files.t5,
        tokenizer=CLIPTokenizer.from_pretrained(flux_files.repo / "tokenizer"),
        tokenizer_2=T5TokenizerFast.from_pretrained(flux_files.repo / "tokenizer_2"),
    )


def noise_for(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.slow
@pytest.mark.parametrize(("guidance", "steps"), [(3.5, 4), (7.0, 2)])
def test_matches_diffusers_flux_pipeline(pipe, diffusers_pipe, guidance, steps):
    noise = noise_for()
    ours = pipe(
        "the cat and the hat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        embedded_guidance=guidance,
        noise=noise,
        t5_sequence_length=16,
    )
    with torch.no_grad():
        theirs = diffusers_pipe(
            "the cat and the hat",
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=patchify(noise),
            max_sequence_length=16,
            output_type="pt",
        ).images
    expected = (theirs[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()
    difference = np.abs(pixels(ours) - expected)
    assert difference.max() <= 1, difference.max()
    other = pipe(
        "a different prompt",
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        embedded_guidance=guidance,
        noise=noise,
        t5_sequence_length=16,
    )
    assert np.abs(pixels(other) - expected).mean() > 2  # the comparison can tell prompts apart


def test_seed_noise_and_true_cfg(pipe):
    first = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=2, seed=3, t5_sequence_length=8)
    again = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=2, noise=noise_for(3), t5_sequence_length=8)
    assert np.array_equal(pixels(first), pixels(again))  # seed -> CPU float32 noise, as documented
    guided = pipe(
        "the cat",
        negative_prompt="the hat",
        cfg_scale=4.0,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        seed=3,
        t5_sequence_length=8,
    )
    assert np.abs(pixels(guided) - pixels(first)).mean() > 1
    metadata = json.loads(first.info["diffsynth"])
    assert metadata["seed"] == 3 and metadata["steps"] == 2 and metadata["size"] == f"{SIZE}x{SIZE}"


def test_image_to_image_and_kontext_run(pipe):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    text_only = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=3, seed=1, t5_sequence_length=8)
    barely = pipe(
        "the cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        seed=1,
        input_image=source,
        denoising_strength=0.001,
        t5_sequence_length=8,
    )
    halfway = pipe(
        "the cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        seed=1,
        input_image=source,
        denoising_strength=0.5,
        t5_sequence_length=8,
    )
    # At a tiny strength sampling starts (and stays) at the input's latents: the result is its VAE round trip.
    round_trip = pipe.decode(pipe.encode_image(source))
    from ds_pipelines import tensor_to_images

    # (A random decoder amplifies the tiny latent change in a few pixels: compare the mean.)
    near = np.abs(pixels(barely) - pixels(tensor_to_images(round_trip)[0])).mean()
    far = np.abs(pixels(halfway) - pixels(barely)).mean()
    assert near < 3 and far > 5 * near, (near, far)
    assert np.abs(pixels(halfway) - pixels(text_only)).mean() > 2
    edited = pipe(
        "the cat", height=SIZE, width=SIZE, num_inference_steps=2, seed=1, kontext_images=source, t5_sequence_length=8
    )
    plain = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=2, seed=1, t5_sequence_length=8)
    assert np.abs(pixels(edited) - pixels(plain)).mean() > 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(height=72), ValueError, "height=72 is not a multiple of 16; the nearest valid sizes are 64 and 80"),
        (dict(width=8), ValueError, "width=8 must be an integer of at least 16"),
        (dict(denoising_strength=0.5), ValueError, "denoising_strength != 1 needs an input_image"),
        (dict(noise=torch.zeros(1, 16, 4, 4)), ValueError, r"noise has shape \(1, 16, 4, 4\); 64x64 needs"),
        (dict(fill_image=Image.new("RGB", (SIZE, SIZE))), ValueError, "Fill needs both fill_image and fill_mask"),
        (
            dict(fill_image=Image.new("RGB", (SIZE, SIZE)), fill_mask=Image.new("L", (SIZE, SIZE))),
            ValueError,
            "go with a FLUX.1-Fill model",
        ),
    ],
)
def test_guards(pipe, kwargs, error, message):
    arguments = dict(height=SIZE, width=SIZE, num_inference_steps=1, seed=0, t5_sequence_length=8) | kwargs
    with pytest.raises(error, match=message):
        pipe("the cat", **arguments)


def test_a_step_cannot_touch_an_undeclared_model(pipe):
    class Sneaky(FluxImagePipeline):
        @pipeline_step("vae")
        def peek(self):
            return self.dit

    sneaky = Sneaky(pipe._components, device="cpu", torch_dtype=torch.float32)
    with pytest.raises(PipelineStepError, match="step 'peek' uses 'dit' without declaring it"):
        sneaky.peek()


def test_steps_move_managed_models(flux_files):
    config = VRAMConfig(storage="cpu", computation_device="cpu", computation_dtype=torch.float32)
    managed = FluxImagePipeline.from_pretrained(
        flux_files.repo, torch_dtype=torch.float32, device="cpu", vram=config, progress_bar=False
    )
    seen = {}
    original = managed.dit.forward

    def spy(*args, **kwargs):
        for name in ("text_encoder", "text_encoder_2", "vae"):
            report = get_vram_handle(managed._components[name]).report()
            seen[name] = report.on_device_bytes - report.buffer_bytes
        return original(*args, **kwargs)

    managed.dit.forward = spy
    image = managed("the cat", height=SIZE, width=SIZE, num_inference_steps=1, seed=0, t5_sequence_length=8)
    assert seen == {"text_encoder": 0, "text_encoder_2": 0, "vae": 0}  # offloaded while the DiT runs
    reference = FluxImagePipeline.from_pretrained(
        flux_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )  # the diffusers layout, unmanaged
    expected = reference("the cat", height=SIZE, width=SIZE, num_inference_steps=1, seed=0, t5_sequence_length=8)
    assert np.abs(pixels(image) - pixels(expected)).max() <= 1


def test_save_image_writes_metadata_atomically(pipe, tmp_path):
    image = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=1, seed=5, t5_sequence_length=8)
    path = save_image(image, tmp_path / "out.png")
    with Image.open(path) as saved:
        assert "Seed: 5" in saved.info["parameters"] and saved.info["parameters"].startswith("the cat")
        assert json.loads(saved.info["diffsynth"])["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_image(image, tmp_path / "missing" / "out.png")

    class Broken(Image.Image):
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    broken = Broken()
    broken.info = image.info
    with pytest.raises(OSError, match="disk full"):
        save_image(broken, tmp_path / "second.png")
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]  # no half-written file left behind


@pytest.mark.slow
def test_fill_matches_diffusers_flux_fill_pipeline(pipe, diffusers_pipe, monkeypatch):
    """Fill-dev: masked-image latents and the mask folded to 256 channels, as diffusers' FluxFillPipeline does.

    We encode images to the mean of the VAE's Gaussian (deterministic, as DiffSynth does); diffusers (and BFL)
    draw a sample, so diffusers is made to use the mean here.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    import dataclasses

    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    from ds_models_flux import FluxDiT
    from tests.models.flux.test_dit import diffusers_kwargs, diffusers_to_bfl, randomize

    config = dataclasses.replace(pipe.dit.config, in_channels=384, out_channels=64)
    transformer = FluxTransformer2DModel(**diffusers_kwargs(config)).eval()
    randomize(transformer, seed=31)
    dit = FluxDiT(config).eval()
    dit.load_state_dict(diffusers_to_bfl(transformer.state_dict()), strict=True)
    ours = FluxImagePipeline(
        {**pipe._components, "dit": dit}, device="cpu", torch_dtype=torch.float32, progress_bar=False
    )
    shared = ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    theirs = FluxFillPipeline(**{name: diffusers_pipe.components[name] for name in shared}, transformer=transformer)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 16, 40, 56))
    noise = noise_for(2)
    result = ours(
        "the cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        noise=noise,
        fill_image=image,
        fill_mask=mask,
        embedded_guidance=30.0,
        t5_sequence_length=16,
    )
    with torch.no_grad():
        expected = theirs(
            "the cat",
            image=image,
            mask_image=mask,
            height=SIZE,
            width=SIZE,
            num_inference_steps=2,
            guidance_scale=30.0,
            latents=patchify(noise),
            max_sequence_length=16,
            output_type="pt",
        ).images
    expected = (expected[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()
    assert np.abs(pixels(result) - expected).max() <= 1
    other_mask = Image.new("L", (SIZE, SIZE), 0)
    moved = ours(
        "the cat",
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        noise=noise,
        fill_image=image,
        fill_mask=other_mask,
        embedded_guidance=30.0,
        t5_sequence_length=16,
    )
    assert np.abs(pixels(moved) - expected).mean() > 1  # the mask reaches the model


def test_from_pretrained_with_a_list_of_model_configs(flux_files, pipe):
    """Like DiffSynth's model_configs=[...]: files are recognised by detection, whatever their order."""
    folder = flux_files.bfl_repo
    listed = FluxImagePipeline.from_pretrained(
        model_configs=[
            folder / "text_encoder_2",
            folder / "ae.safetensors",
            folder / "tokenizer_2",
            folder / "flux1-dev.safetensors",
            folder / "text_encoder",
            folder / "tokenizer",
        ],
        torch_dtype=torch.float32,
        device="cpu",
        progress_bar=False,
    )
    expected = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=1, seed=0, t5_sequence_length=8)
    result = listed("the cat", height=SIZE, width=SIZE, num_inference_steps=1, seed=0, t5_sequence_length=8)
    assert np.array_equal(pixels(result), pixels(expected))
    with pytest.raises(ValueError, match="no source for tokenizer, text_encoder, tokenizer_2, text_encoder_2, dit;"):
        FluxImagePipeline.from_pretrained(model_configs=[folder / "ae.safetensors"], device="cpu")
