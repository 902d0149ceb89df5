"""WanVideoPipeline against diffusers' WanPipeline / WanImageToVideoPipeline on the same tiny weights and noise.

Every mode loads our pipeline from a diffusers folder with ``from_pretrained`` and runs diffusers' pipeline on the
very modules that wrote it. diffusers' Euler grid ends elsewhere by default, so its scheduler is handed the official
unshifted grid ``linspace(0.999, 0, N + 1)[:-1]`` (and shifts it, as ours does). The latents entering the VAE are
compared as floats and the frames as 8-bit pixels.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ds_pipelines import WanVideoPipeline
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401  (the session fixture)

SIZE, FRAMES = 32, 5  # 2 latent frames of 4x4 (2.1 VAE) or 2x2 (2.2 VAE)
KW = dict(negative_prompt="blurry", height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=3)


@pytest.fixture(autouse=True)
def _no_ftfy(monkeypatch):
    """diffusers' I2V prompt cleaning calls ftfy (not installed); it is the identity on these ASCII prompts."""
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v

    monkeypatch.setattr(i2v, "ftfy", SimpleNamespace(fix_text=lambda text: text), raising=False)


def load(folder, **kwargs) -> WanVideoPipeline:
    return WanVideoPipeline.from_pretrained(
        folder, torch_dtype=torch.float32, device="cpu", progress_bar=False, **kwargs
    )


@pytest.fixture(scope="module")
def pipes(wan_files) -> SimpleNamespace:  # noqa: F811
    return SimpleNamespace(
        **{name: load(getattr(wan_files, name)) for name in ("t2v", "i2v", "flf2v", "a14b", "ti2v")}
    )


def noise_for(channels: int = 16, side: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, channels, 2, side, side, generator=torch.Generator().manual_seed(seed))


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))


def official_scheduler(sampler: str = "euler", shift: float = 5.0):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if sampler == "euler":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    else:
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    original = scheduler.set_timesteps

    def set_timesteps(steps, device=None, **_):
        return original(sigmas=np.linspace(0.999, 0, steps + 1)[:-1], device=device)

    scheduler.set_timesteps = set_timesteps
    return scheduler


def diffusers_pipe(files, transformer, vae=None, image=False, **kwargs):
    from diffusers import WanImageToVideoPipeline, WanPipeline
    from transformers import AutoTokenizer, CLIPImageProcessor

    parts = dict(
        tokenizer=AutoTokenizer.from_pretrained(files.tokenizer_path),
        text_encoder=files.text_encoder,
        transformer=transformer,
        vae=vae or files.vae,
        scheduler=kwargs.pop("scheduler", None) or official_scheduler(),
    )
    if not image:
        return WanPipeline(**parts, **kwargs)
    if kwargs.get("expand_timesteps"):
        return WanImageToVideoPipeline(**parts, **kwargs)
    processor = CLIPImageProcessor(do_resize=False, do_center_crop=False)  # 32 px frames are CLIP's size here
    return WanImageToVideoPipeline(**parts, image_encoder=files.image_encoder, image_processor=processor, **kwargs)


def run_both(pipe, reference, noise, image_kwargs=None, **kwargs):
    """(our frames, our final latents, diffusers' frames as uint8, diffusers' final latents)."""
    captured = {}
    decode = pipe.decode

    def spy(latents, *args, **kw):
        captured["latents"] = latents.clone()
        return decode(latents, *args, **kw)

    pipe.decode = spy
    try:
        ours = pipe("the cat and the hat", noise=noise, **(image_kwargs or {}), **{**KW, **kwargs})
    finally:
        del pipe.decode
    theirs_kwargs = {**KW, **kwargs}
    theirs_kwargs.pop("sampler", None)
    if image_kwargs:
        theirs_kwargs.update(image=image_kwargs["input_image"], last_image=image_kwargs.get("end_image"))
    with torch.no_grad():
        latents = reference(prompt="the cat and the hat", latents=noise, output_type="latent", **theirs_kwargs).frames
        frames = reference(prompt="the cat and the hat", latents=noise, output_type="np", **theirs_kwargs).frames[0]
    return ours, captured["latents"], (frames * 255).round().astype(np.int16), latents


def assert_parity(ours, our_latents, frames, latents):
    torch.testing.assert_close(our_latents, latents.float(), rtol=1e-4, atol=1e-4)
    pixels = np.stack([np.asarray(frame) for frame in ours]).astype(np.int16)
    assert pixels.shape == frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.abs(pixels - frames).max() <= 1
    assert pixels.std() > 10  # not a degenerate (flat) video


@pytest.mark.slow
def test_text_to_video_matches_diffusers(pipes, wan_files):  # noqa: F811
    reference = diffusers_pipe(wan_files, wan_files.t2v_transformer)
    ours, our_latents, frames, latents = run_both(pipes.t2v, reference, noise_for())
    assert_parity(ours, our_latents, frames, latents)
    other = pipes.t2v("a different prompt", noise=noise_for(), **KW)
    assert np.abs(np.stack([np.asarray(f) for f in other]).astype(np.int16) - frames).mean() > 2
    assert ours.fps == 16 and ours.parameters["num_frames"] == FRAMES


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["i2v", "flf2v"])
def test_image_to_video_matches_diffusers(pipes, wan_files, mode):  # noqa: F811
    transformer = wan_files.i2v_transformer if mode == "i2v" else wan_files.flf2v_transformer
    reference = diffusers_pipe(wan_files, transformer, image=True)
    images = dict(input_image=picture(1), end_image=picture(2) if mode == "flf2v" else None)
    ours, our_latents, frames, latents = run_both(getattr(pipes, mode), reference, noise_for(), images)
    assert_parity(ours, our_latents, frames, latents)
    images["input_image"] = picture(3)
    other = getattr(pipes, mode)("the cat and the hat", noise=noise_for(), **images, **KW)
    assert np.abs(np.stack([np.asarray(f) for f in other]).astype(np.int16) - frames).mean() > 1  # the image matters


def test_unipc_matches_diffusers(pipes, wan_files):  # noqa: F811
    reference = diffusers_pipe(wan_files, wan_files.t2v_transformer, scheduler=official_scheduler("unipc"))
    ours, our_latents, frames, latents = run_both(
        pipes.t2v, reference, noise_for(), sampler="unipc", num_inference_steps=4
    )
    assert_parity(ours, our_latents, frames, latents)
    euler = pipes.t2v("the cat and the hat", noise=noise_for(), **{**KW, "num_inference_steps": 4})
    assert np.abs(np.stack([np.asarray(f) for f in euler]).astype(np.int16) - frames).mean() > 0.5


def record_timesteps(pipe, name):
    calls = []
    model = pipe._components[name]
    original = model.forward

    def spy(latents, timestep, *args, **kwargs):
        calls.append(timestep.detach().clone())
        return original(latents, timestep, *args, **kwargs)

    model.forward = spy
    return calls, lambda: delattr(model, "forward")


def test_a14b_switches_experts_at_the_boundary(pipes, wan_files):  # noqa: F811
    pipe = pipes.a14b
    high, undo_high = record_timesteps(pipe, "dit")
    low, undo_low = record_timesteps(pipe, "dit2")
    try:
        reference = diffusers_pipe(
            wan_files, wan_files.high_noise, transformer_2=wan_files.low_noise, boundary_ratio=0.875
        )
        ours, our_latents, frames, latents = run_both(pipe, reference, noise_for(), num_inference_steps=4)
        assert_parity(ours, our_latents, frames, latents)
        # shift 5 over 4 steps: t = 999.8, 937.0, 833.1, 652.0; the high-noise expert runs while t >= 875.
        assert pipe.last_experts == ["dit", "dit", "dit2", "dit2"]
        assert [round(float(t[0])) for t in high] == [1000, 1000, 937, 937]  # conditional + unconditional passes
        assert all(float(t[0]) < 875 for t in low) and len(low) == 4
        high.clear()
        pipe("the cat", noise=noise_for(), boundary=0.8, cfg_scale=1.0, **{**KW, "num_inference_steps": 4})
        assert pipe.last_experts == ["dit", "dit", "dit", "dit2"] and len(high) == 3  # one pass per step at cfg 1
        assert pipe._boundary(None, image_to_video=True) == 0.9 and pipe._boundary(None, False) == 0.875
        high.clear()
        low.clear()  # the official (low, high) guidance pair: guided high-noise steps, one pass per low-noise step
        pipe("the cat", noise=noise_for(), cfg_scale=1.0, cfg_scale_high_noise=4.0, **{**KW, "num_inference_steps": 4})
        assert len(high) == 4 and len(low) == 2
    finally:
        undo_high()
        undo_low()


def test_ti2v_pins_the_first_frame_with_per_token_timesteps(pipes, wan_files):  # noqa: F811
    pipe = pipes.ti2v
    calls, undo = record_timesteps(pipe, "dit")
    try:
        reference = diffusers_pipe(
            wan_files, wan_files.ti2v_transformer, vae=wan_files.vae22, image=True, expand_timesteps=True
        )
        ours, our_latents, frames, latents = run_both(pipe, reference, noise_for(48, 2), dict(input_image=picture(1)))
        assert_parity(ours, our_latents, frames, latents)
        # 2 latent frames of 2x2 latents in 2x2 patches: one token per frame, and frame 0's is clean (t = 0).
        per_token = calls[0]
        assert per_token.shape == (1, 2) and float(per_token[0, 0]) == 0 and float(per_token[0, 1]) > 900
        first = pipe.encode_video(pipe_pixels(picture(1))[:, :, None], tiled=False)
        torch.testing.assert_close(our_latents[:, :, :1], first, rtol=1e-5, atol=1e-5)
        assert ours.fps == 24
        calls.clear()
        pipe("the cat", noise=noise_for(48, 2), **KW)  # text-to-video on TI2V: one timestep for every token
        assert calls[0].shape == (1,)
    finally:
        undo()


def pipe_pixels(image):
    from ds_pipelines import image_to_tensor

    return image_to_tensor(image)
