"""QwenImagePipeline against diffusers' QwenImagePipeline on the same tiny components (CFG off and on), its schedules
against diffusers' scheduler, the true-CFG rescale, image-to-image and inpainting, its guards, VRAM management,
LoRA files in diffusers, and the preset defaults."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ds_pipelines import FlowMatchScheduler, save_image
from ds_pipelines.qwen_image import QwenImagePipeline, pack_latents, true_cfg
from ds_vram import VRAMConfig
from tests.pipelines.qwen_image_fixtures import diffusers_pipeline, qwen_image_files  # noqa: F401  (session fixture)

SIZE = 64  # pixels: 8x8 latents, 16 image tokens
PROMPT = "the cat and the hat"
# Most of what the DiT reads is the template's system prompt; a long different prompt moves the image clearly.
OTHER_PROMPT = "a red dog on a blue sofa under the moon, " * 6


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def pipe(qwen_image_files) -> QwenImagePipeline:  # noqa: F811
    return QwenImagePipeline.from_pretrained(
        qwen_image_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


@pytest.fixture(scope="module")
def diffusers_pipe(qwen_image_files):  # noqa: F811
    return diffusers_pipeline(qwen_image_files)


def noise_for(seed: int = 0, size: int = SIZE) -> torch.Tensor:
    return torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def reference(diffusers_pipe, prompt: str, noise: torch.Tensor, **kwargs) -> np.ndarray:
    """diffusers' image as 8-bit values; diffusers takes the noise packed."""
    height, width = noise.shape[-2] * 8, noise.shape[-1] * 8
    with torch.no_grad():
        images = diffusers_pipe(
            prompt, height=height, width=width, latents=pack_latents(noise.clone()), output_type="pt", **kwargs
        ).images
    return (images[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()


def run(pipe: QwenImagePipeline, prompt: str = PROMPT, **kwargs) -> np.ndarray:
    options = dict(height=SIZE, width=SIZE, num_inference_steps=3, seed=0) | kwargs
    return pixels(pipe(prompt, **options))


# ---------------------------------------------------------------------------------------------- the schedules
@pytest.mark.parametrize(("steps", "size"), [(2, 64), (4, 64), (30, 1328), (8, 512), (50, 2048)])
def test_sigmas_equal_diffusers_scheduler(qwen_image_files, steps, size):  # noqa: F811
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    theirs = FlowMatchEulerDiscreteScheduler.from_pretrained(qwen_image_files.repo / "scheduler")
    tokens = (size // 16) ** 2
    config = theirs.config
    mu = calculate_shift(
        tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    theirs.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = FlowMatchScheduler("qwen-image")
    ours.set_timesteps(steps, image_sequence_length=tokens)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=1e-6)
    if steps > 1:
        assert float(ours.sigmas[-2]) == pytest.approx(0.02)  # the terminal stretch


@pytest.mark.parametrize("steps", [4, 8])
def test_lightning_schedule_equals_its_scheduler_config(steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    # lightx2v/Qwen-Image-Lightning's scheduler config: exponential dynamic shifting at mu = ln 3, no terminal.
    theirs = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        base_shift=float(np.log(3)),
        max_image_seq_len=8192,
        max_shift=float(np.log(3)),
        num_train_timesteps=1000,
        shift=1.0,
        shift_terminal=None,
        time_shift_type="exponential",
        use_dynamic_shifting=True,
    )
    theirs.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=float(np.log(3)))
    ours = FlowMatchScheduler("qwen-image-lightning")
    ours.set_timesteps(steps, image_sequence_length=4096)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=1e-6)


def test_true_cfg_rescales_each_token_to_the_conditional_norm():
    generator = torch.Generator().manual_seed(0)
    positive, negative = (torch.randn(1, 16, 4, 6, generator=generator) for _ in range(2))
    guided = true_cfg(positive, negative, 4.0)
    # diffusers' formula on packed tokens
    pos, neg = pack_latents(positive), pack_latents(negative)
    comb = neg + 4.0 * (pos - neg)
    expected = comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    torch.testing.assert_close(pack_latents(guided), expected)
    torch.testing.assert_close(
        torch.norm(pack_latents(guided), dim=-1), torch.norm(pos, dim=-1)
    )  # the rescale, token by token


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0], ids=["cfg-off", "cfg-on"])
def test_matches_diffusers_qwen_image_pipeline(pipe, diffusers_pipe, cfg_scale):
    noise = noise_for()
    negative = "blurry"
    image = pipe(
        PROMPT,
        negative_prompt=negative,
        cfg_scale=cfg_scale,
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        noise=noise,
    )
    # diffusers runs CFG only when a negative prompt is given, and then when true_cfg_scale > 1.
    expected = reference(
        diffusers_pipe, PROMPT, noise, negative_prompt=negative, true_cfg_scale=cfg_scale, num_inference_steps=4
    )
    difference = np.abs(pixels(image) - expected)
    assert difference.max() <= 1, difference.max()
    # The comparison can tell prompts and guidance apart.
    other = pipe(
        OTHER_PROMPT,
        negative_prompt=negative,
        cfg_scale=cfg_scale,
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        noise=noise,
    )
    assert np.abs(pixels(other) - expected).mean() > 1
    if cfg_scale > 1:
        plain = reference(
            diffusers_pipe, PROMPT, noise, negative_prompt=negative, true_cfg_scale=1.0, num_inference_steps=4
        )
        assert np.abs(plain - expected).mean() > 1


def test_cfg_uses_the_empty_negative_prompt_by_default(pipe, diffusers_pipe):
    noise = noise_for(1)
    image = pipe(PROMPT, cfg_scale=3.0, height=SIZE, width=SIZE, num_inference_steps=3, noise=noise)
    expected = reference(diffusers_pipe, PROMPT, noise, negative_prompt="", true_cfg_scale=3.0, num_inference_steps=3)
    assert np.abs(pixels(image) - expected).max() <= 1


def test_a_non_square_size_matches_diffusers(pipe, diffusers_pipe):
    noise = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(2))  # 48 x 80 pixels
    image = pipe(PROMPT, cfg_scale=1.0, height=48, width=80, num_inference_steps=3, noise=noise)
    assert image.size == (80, 48)
    expected = reference(diffusers_pipe, PROMPT, noise, num_inference_steps=3)
    assert np.abs(pixels(image) - expected).max() <= 1


# ---------------------------------------------------------------------------------------------- behaviour
def test_seed_noise_metadata_and_saved_file(pipe, tmp_path):
    first = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=2, seed=3, cfg_scale=1.0)
    again = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=2, noise=noise_for(3), cfg_scale=1.0)
    assert np.array_equal(pixels(first), pixels(again))  # seed -> CPU float32 noise, as documented
    metadata = json.loads(first.info["diffsynth"])
    assert metadata["seed"] == 3 and metadata["steps"] == 2 and metadata["size"] == f"{SIZE}x{SIZE}"
    assert metadata["cfg_scale"] == 1.0 and metadata["schedule"] == "qwen-image"
    path = save_image(first, tmp_path / "cat.png")
    with Image.open(path) as saved:
        assert json.loads(saved.info["diffsynth"])["seed"] == 3


def test_defaults_are_qwen_image_and_a_call_uses_them(pipe):
    assert QwenImagePipeline.default_options == {
        "cfg_scale": 4.0,
        "height": 1328,
        "width": 1328,
        "num_inference_steps": 30,
        "schedule": "qwen-image",
    }
    calls = []
    original = QwenImagePipeline.predict

    def counting(model, latents, sigmas, conditions):
        calls.append(float(sigmas[0]))
        return original(model, latents, sigmas, conditions)

    pipe.predict = counting  # the instance attribute shadows the staticmethod for this test
    try:
        image = pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=2, seed=0)
    finally:
        del pipe.predict
    assert len(calls) == 4  # 2 steps, CFG on at the default 4: two DiT calls each
    assert json.loads(image.info["diffsynth"])["cfg_scale"] == 4.0


def test_lightning_schedule_is_selectable(pipe):
    default = run(pipe, cfg_scale=1.0)
    lightning = pipe(
        PROMPT, height=SIZE, width=SIZE, num_inference_steps=3, seed=0, cfg_scale=1.0, schedule="qwen-image-lightning"
    )
    assert np.abs(pixels(lightning) - default).mean() > 0.5
    assert json.loads(lightning.info["diffsynth"])["schedule"] == "qwen-image-lightning"


def final_latents(pipe: QwenImagePipeline, **kwargs) -> torch.Tensor:
    """The latents a call decodes (the VAE's attention mixes every pixel with every other, so a region is judged
    in latent space)."""
    seen = []
    decode = pipe.decode

    def capture(latents, *args, **options):
        seen.append(latents.float().clone())
        return decode(latents, *args, **options)

    pipe.decode = capture
    try:
        pipe(PROMPT, **(dict(height=SIZE, width=SIZE, num_inference_steps=4, seed=0, cfg_scale=1.0) | kwargs))
    finally:
        del pipe.decode
    return seen[0]


def test_image_to_image_starts_from_the_input(pipe):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    start = pipe.encode_image(source).float()
    # The schedule's terminal stretch still lifts the last sigma to 0.02, so a small strength stays near the input.
    distance = {
        strength: (final_latents(pipe, input_image=source, denoising_strength=strength) - start).abs().mean()
        for strength in (0.05, 0.5, 0.95)
    }
    assert distance[0.05] < 0.5 * distance[0.5] < 0.5 * distance[0.95], distance
    image = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=2, input_image=source, denoising_strength=0.5)
    assert json.loads(image.info["diffsynth"])["denoising_strength"] == 0.5


def test_inpaint_mask_keeps_the_unmasked_part(pipe):
    source = Image.fromarray(np.random.default_rng(1).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # repaint the left half: latent columns 0-3
    start = pipe.encode_image(source).float()
    plain = final_latents(pipe, input_image=source, denoising_strength=0.9)
    inpainted = final_latents(pipe, input_image=source, denoising_strength=0.9, inpaint_mask=mask)
    kept = (inpainted[..., 4:] - start[..., 4:]).abs().max()
    assert kept < 1e-4, kept  # the velocity outside the mask leads straight back to the input
    assert (plain[..., 4:] - start[..., 4:]).abs().mean() > 0.1
    assert (inpainted[..., :4] - start[..., :4]).abs().mean() > 0.1


# ---------------------------------------------------------------------------------------------- guards
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(denoising_strength=0.5), "denoising_strength=0.5 needs an input_image"),
        (dict(height=72), "height=72 is not a multiple of 16; the nearest valid sizes are 64 and 80"),
        (dict(width=100), "width=100 is not a multiple of 16"),
        (dict(noise=torch.zeros(1, 16, 4, 4)), r"noise has shape \(1, 16, 4, 4\); 64x64 needs"),
        (dict(edit_image="cat.png"), r"edit_image is a str \('cat.png'\), not a PIL image"),
        (dict(edit_image=[Image.new("RGB", (SIZE, SIZE)), np.zeros((4, 4, 3))]), r"edit_image\[1\] is a ndarray"),
        (dict(edit_image=[]), "edit_image is an empty list"),
        (dict(cfg_scale=float("nan")), "cfg_scale=nan must be a finite number"),
        (dict(schedule="flux.1"), "schedule='flux.1' is not a Qwen-Image schedule"),
        (dict(inpaint_mask=Image.new("L", (SIZE, SIZE))), "inpaint_mask needs the input_image"),
    ],
)
def test_guards(pipe, kwargs, message):
    arguments = dict(height=SIZE, width=SIZE, num_inference_steps=1, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        pipe("the cat", **arguments)


def test_edit_image_needs_the_processor(pipe):
    with pytest.raises(ValueError, match=r"edit_image needs Qwen2\.5-VL.s processor"):
        pipe("the cat", height=SIZE, width=SIZE, num_inference_steps=1, edit_image=Image.new("RGB", (SIZE, SIZE)))


def test_a_prompt_over_512_tokens_is_an_error_that_says_so(pipe):
    long_prompt = " ".join(["the cat"] * 400)  # about 800 tokens with this tokenizer
    with pytest.raises(ValueError, match="512") as caught:
        pipe(long_prompt, height=SIZE, width=SIZE, num_inference_steps=1, seed=0, cfg_scale=1.0)
    assert "token" in str(caught.value)
    with pytest.raises(ValueError, match="512"):  # the negative prompt is checked too, when CFG uses it
        pipe("the cat", negative_prompt=long_prompt, cfg_scale=2.0, height=SIZE, width=SIZE, num_inference_steps=1)


# ---------------------------------------------------------------------------------------------- VRAM
def test_streamed_from_disk_under_a_vram_limit_gives_the_same_image(qwen_image_files, pipe):  # noqa: F811
    disk = VRAMConfig(storage="disk", computation_device="cpu", computation_dtype=torch.float32, vram_limit=0)
    streamed = QwenImagePipeline.from_pretrained(
        qwen_image_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False, vram=disk
    )
    assert all(next(iter(m.parameters())).device.type in ("meta", "cpu") for m in streamed.models.values())
    expected = run(pipe, cfg_scale=2.0, num_inference_steps=2)
    assert np.abs(run(streamed, cfg_scale=2.0, num_inference_steps=2) - expected).max() <= 1


def test_fp8_storage_runs_with_no_model_change(qwen_image_files, pipe):  # noqa: F811
    fp8 = VRAMConfig(storage="cpu", storage_dtype="fp8", computation_device="cpu", computation_dtype=torch.float32)
    stored = QwenImagePipeline.from_pretrained(
        qwen_image_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False, vram={"dit": fp8}
    )
    image = run(stored, cfg_scale=2.0, num_inference_steps=2)
    expected = run(pipe, cfg_scale=2.0, num_inference_steps=2)
    difference = np.abs(image - expected).mean()
    assert 0 < difference < 20, difference  # rounded weights: close to, not equal to, the float32 image
