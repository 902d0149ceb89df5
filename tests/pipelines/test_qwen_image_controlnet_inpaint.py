"""QwenImagePipeline with an InstantX Qwen-Image ControlNet Inpainting (the Union architecture with
``extra_condition_channels=4``: 17 latent channels a pixel, the picture with the pixels to repaint blacked out, then
``1 - mask``) given ``ControlNetInput(image, inpaint_mask=...)``, against diffusers' QwenImageControlNetInpaintPipeline
on the same tiny components and noise, CFG off and on.

What diffusers 0.42's pipeline does, and so what is compared:
- The conditioning (``prepare_image_with_mask``): the control image and the mask resized (LANCZOS) to the output
  size, the mask thresholded at 0.5, the masked pixels set to -1 before the VAE, the pixel mask resized (nearest) to
  latent size and inverted. The mask here is not aligned to the 8-pixel latent grid and has pixels just below and
  just above the threshold, and both inputs are given at another size than the output, so each of these rules is
  exercised.
- It encodes the masked picture with ``latent_dist.sample()`` (a fresh posterior draw each call); we take the mean,
  as for every other image we encode. The test makes diffusers take the mean too.
- It is ControlNet-level inpainting only: the latents are never blended with the original picture outside the mask
  (there is no ``image`` / ``mask_image`` pair, and the sampler starts from pure noise). Our pipeline's pipeline-level
  inpainting (``input_image`` + ``inpaint_mask`` on the call) has no counterpart there, so ours runs without it; with
  it, the kept region is pulled back to the input picture (checked below), which diffusers' pipeline cannot do.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import QwenImageControlNetModel
from PIL import Image

from ds_models_qwen_image.controlnet import QwenImageControlNetUnion, QwenImageControlNetUnionConfig
from ds_pipelines import ControlNetInput
from ds_pipelines.qwen_image import QwenImagePipeline, pack_latents
from tests.pipelines.qwen_image_fixtures import qwen_image_files, randomize, scheduler, tokenizer  # noqa: F401
from tests.pipelines.test_qwen_image_controlnet import union_kwargs

SIZE = 64
PROMPT = "the cat and the hat"
SOURCE = 80  # the control image and the mask are given at 80 x 80 and resized to the 64 x 64 output


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def inpaint_controlnet(tmp_path_factory):
    """A tiny InstantX Inpainting ControlNet, saved as the release is (config.json + safetensors)."""
    model = randomize(QwenImageControlNetModel(**union_kwargs(extra=4)), 83)
    folder = tmp_path_factory.mktemp("qwen_image_controlnet_inpaint") / "InstantX-Inpainting"
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def pipe(qwen_image_files, inpaint_controlnet) -> QwenImagePipeline:  # noqa: F811
    return QwenImagePipeline.from_pretrained(
        qwen_image_files.repo,
        model_configs=[inpaint_controlnet[0]],  # named "controlnet" by detection
        torch_dtype=torch.float32,
        device="cpu",
        progress_bar=False,
    )


def picture(seed: int) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (SOURCE // 5, SOURCE // 5, 3), dtype=np.uint8)
    return Image.fromarray(array).resize((SOURCE, SOURCE), Image.Resampling.BICUBIC)


def mask_image(left: bool = True) -> Image.Image:
    """White = repaint: a rectangle off the latent grid, a band at 127 (kept) and one at 128 (repainted)."""
    mask = Image.new("L", (SOURCE, SOURCE), 0)
    box = (7, 11, 47, 61) if left else (33, 19, 73, 69)
    mask.paste(255, box)
    mask.paste(127, (box[0], box[3], box[2], box[3] + 6))
    mask.paste(128, (box[0], box[1] - 6, box[2], box[1]))
    return mask


def noise_for(seed: int) -> torch.Tensor:
    return torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def ours(pipe: QwenImagePipeline, noise: torch.Tensor, control, cfg_scale: float, **kwargs) -> np.ndarray:
    options = dict(height=SIZE, width=SIZE, num_inference_steps=4, noise=noise.clone(), negative_prompt="blurry")
    return pixels(pipe(PROMPT, controlnet_inputs=control, cfg_scale=cfg_scale, **(options | kwargs)))


def test_the_file_loads_as_the_inpainting_union(pipe):
    model = pipe.controlnet
    assert isinstance(model, QwenImageControlNetUnion)
    extra = QwenImageControlNetUnionConfig.inpainting().extra_condition_channels
    assert model.config == dataclasses.replace(QwenImageControlNetUnionConfig.tiny(), extra_condition_channels=extra)
    assert pipe.control_channels() == 17


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0], ids=["cfg-off", "cfg-on"])
def test_matches_diffusers_controlnet_inpaint_pipeline(
    qwen_image_files,  # noqa: F811
    inpaint_controlnet,
    pipe,
    monkeypatch,
    cfg_scale,
):
    from diffusers import QwenImageControlNetInpaintPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    # diffusers samples the masked picture's posterior; make it take the mean, as we do.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    theirs = QwenImageControlNetInpaintPipeline(
        scheduler=scheduler(qwen_image_files),
        vae=qwen_image_files.vae,
        text_encoder=qwen_image_files.text_encoder,
        tokenizer=tokenizer(qwen_image_files),
        transformer=qwen_image_files.transformer,
        controlnet=inpaint_controlnet[1],
    )
    theirs.set_progress_bar_config(disable=True)
    noise, image, mask = noise_for(1), picture(3), mask_image()
    with torch.no_grad():
        expected = theirs(
            PROMPT,
            negative_prompt="blurry",
            true_cfg_scale=cfg_scale,
            control_image=image,
            control_mask=mask,
            controlnet_conditioning_scale=0.8,
            height=SIZE,
            width=SIZE,
            num_inference_steps=4,
            latents=pack_latents(noise.clone()),
            output_type="pt",
        ).images
    expected = (expected[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()
    got = ours(pipe, noise, ControlNetInput(image, scale=0.8, inpaint_mask=mask), cfg_scale)
    assert np.abs(got - expected).max() <= 1, np.abs(got - expected).max()
    # The ControlNet, the picture and the mask each change the image.
    for other in (
        None,
        ControlNetInput(picture(4), scale=0.8, inpaint_mask=mask),
        ControlNetInput(image, scale=0.8, inpaint_mask=mask_image(left=False)),
    ):
        assert np.abs(ours(pipe, noise, other, cfg_scale) - expected).mean() > 1


def test_pipeline_level_inpainting_keeps_the_picture_outside_the_mask(pipe, monkeypatch):
    """What diffusers' ControlNet inpaint pipeline lacks: with ``input_image`` + ``inpaint_mask`` on the call too, the
    final latents outside the mask are the input picture's, and inside it they are repainted. (Compared as latents:
    the VAE decoder's mid-block attention lets every pixel see the repainted part.)"""
    image = picture(5).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # repaint the left half (latent columns 0-3)
    control = ControlNetInput(image, scale=0.8, inpaint_mask=mask)
    decoded = []
    decode = pipe.decode

    def recording(latents, *args, **kwargs):
        decoded.append(latents.clone())
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(pipe, "decode", recording)
    noise = noise_for(2)
    ours(pipe, noise, control, 1.0, input_image=image, inpaint_mask=mask)
    ours(pipe, noise, control, 1.0)
    blended, free = decoded
    with torch.no_grad():
        start = pipe.encode_image(image)
    kept, repainted = (..., slice(SIZE // 16, None)), (..., slice(None, SIZE // 16))
    torch.testing.assert_close(blended[kept], start[kept], atol=1e-4, rtol=1e-4)
    assert (free[kept] - start[kept]).abs().mean() > 0.3
    assert (blended[repainted] - start[repainted]).abs().mean() > 0.3
