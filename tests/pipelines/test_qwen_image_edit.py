"""QwenImagePipeline with edit images against diffusers' QwenImageEditPlusPipeline on the same tiny components (one and
two images, CFG off and on, Edit-2511's zero_cond_t), the output size taken from the last edit image, and the original
Edit model's single-image template.

diffusers sizes edit images at about 1 MP for the VAE and 384² for Qwen2.5-VL, and so do we; at tiny widths that
would make the test slow, so both pipelines' areas are lowered to the same small values here (module constants in
both).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import ds_pipelines.qwen_image as qwen_image
from ds_pipelines.qwen_image import QwenImagePipeline, edit_dimensions, pack_latents
from tests.pipelines.qwen_image_fixtures import diffusers_edit_plus_pipeline, qwen_image_files  # noqa: F401

SIZE = 64
PROMPT = "put the cat on the sofa"
VAE_AREA = 96 * 64  # edit images as the VAE encodes them (a 3:2 image stays 96 x 64)
VL_AREA = 64 * 64  # ... and as Qwen2.5-VL sees them


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


@pytest.fixture(autouse=True)
def small_edit_areas(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as theirs

    monkeypatch.setattr(theirs, "VAE_IMAGE_SIZE", VAE_AREA)
    monkeypatch.setattr(theirs, "CONDITION_IMAGE_SIZE", VL_AREA)
    monkeypatch.setattr(qwen_image, "EDIT_VAE_AREA", VAE_AREA)
    monkeypatch.setattr(qwen_image, "EDIT_VL_AREA", VL_AREA)


@pytest.fixture(scope="module")
def edit_pipe(qwen_image_files) -> QwenImagePipeline:  # noqa: F811
    return QwenImagePipeline.from_pretrained(
        qwen_image_files.edit_repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


@pytest.fixture(scope="module")
def edit_2511_pipe(qwen_image_files) -> QwenImagePipeline:  # noqa: F811
    return QwenImagePipeline.from_pretrained(
        qwen_image_files.edit_2511_repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


def picture(seed: int, width: int, height: int) -> Image.Image:
    """A smooth random picture (the VAE and the VL encoder see structure, not just noise)."""
    generator = np.random.default_rng(seed)
    small = generator.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def noise_for(seed: int = 0, height: int = SIZE, width: int = SIZE) -> torch.Tensor:
    return torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def reference(theirs, images, noise: torch.Tensor, **kwargs) -> np.ndarray:
    height, width = noise.shape[-2] * 8, noise.shape[-1] * 8
    with torch.no_grad():
        output = theirs(
            image=images,
            prompt=PROMPT,
            height=height,
            width=width,
            latents=pack_latents(noise.clone()),
            output_type="pt",
            **kwargs,
        ).images
    return (output[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    ("count", "cfg_scale"), [(1, 1.0), (2, 1.0), (2, 3.0)], ids=["one-image", "two-images", "two-images-cfg"]
)
def test_matches_diffusers_edit_plus_pipeline(qwen_image_files, edit_pipe, count, cfg_scale):  # noqa: F811
    assert edit_pipe.edit_variant == "edit-plus"  # from the folder's model_index.json
    images = [picture(1, 96, 64), picture(2, 64, 64)][:count]
    noise = noise_for(count)
    options = dict(height=SIZE, width=SIZE, num_inference_steps=3, noise=noise, cfg_scale=cfg_scale)
    ours = pixels(edit_pipe(PROMPT, negative_prompt="blurry", edit_image=images, **options))
    theirs = diffusers_edit_plus_pipeline(qwen_image_files)
    expected = reference(
        theirs, images, noise, negative_prompt="blurry", true_cfg_scale=cfg_scale, num_inference_steps=3
    )
    assert np.abs(ours - expected).max() <= 1, np.abs(ours - expected).max()
    # The edit images matter: other pictures give another image.
    others = [picture(7, 96, 64), picture(8, 64, 64)][:count]
    changed = np.abs(pixels(edit_pipe(PROMPT, negative_prompt="blurry", edit_image=others, **options)) - expected)
    assert changed.mean() > 0.3 and changed.max() > 4, (changed.mean(), changed.max())


def test_edit_2511_runs_references_at_time_zero_as_diffusers(qwen_image_files, edit_pipe, edit_2511_pipe):  # noqa: F811
    assert edit_2511_pipe.dit.config.zero_cond_t and not edit_pipe.dit.config.zero_cond_t  # from config.json
    images = [picture(3, 96, 64), picture(4, 64, 64)]
    noise = noise_for(5)
    options = dict(height=SIZE, width=SIZE, num_inference_steps=3, noise=noise, cfg_scale=2.0)
    ours = pixels(edit_2511_pipe(PROMPT, edit_image=images, **options))
    theirs = diffusers_edit_plus_pipeline(qwen_image_files, transformer=qwen_image_files.edit_2511_transformer)
    expected = reference(theirs, images, noise, negative_prompt="", true_cfg_scale=2.0, num_inference_steps=3)
    assert np.abs(ours - expected).max() <= 1
    # Same weights without zero_cond_t (Edit-2509) give another image.
    assert np.abs(pixels(edit_pipe(PROMPT, edit_image=images, **options)) - ours).mean() > 0.5


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(("width", "height"), [(1024, 1024), (1920, 1080), (640, 960), (333, 777), (4000, 100)])
def test_edit_dimensions_equal_diffusers(width, height):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    for area in (1024 * 1024, 384 * 384):
        assert edit_dimensions(width, height, area) == calculate_dimensions(area, width / height)


def test_without_a_size_the_output_takes_the_last_edit_images_aspect(edit_pipe, monkeypatch):
    monkeypatch.setattr(qwen_image, "OUTPUT_AREA", 96 * 64)  # 1 MP in the release; tiny here
    images = [picture(1, 64, 64), picture(2, 300, 200)]
    image = edit_pipe(PROMPT, edit_image=images, num_inference_steps=1, seed=0, cfg_scale=1.0)
    assert image.size == (96, 64)
    assert json.loads(image.info["diffsynth"])["edit_images"] == 2
    tall = edit_pipe(PROMPT, edit_image=picture(3, 200, 300), num_inference_steps=1, seed=0, cfg_scale=1.0)
    assert tall.size == (64, 96)
    given = edit_pipe(PROMPT, edit_image=images, height=48, num_inference_steps=1, seed=0, cfg_scale=1.0)
    assert given.size == (96, 48)  # a given side is kept, the other taken from the edit image


# ---------------------------------------------------------------------------------------------- the original Edit
def test_the_original_edit_model_takes_one_image_with_its_own_template(edit_pipe, monkeypatch):
    from ds_models_qwen_image import text_encoder

    seen = []
    original = text_encoder.format_edit_prompt

    def recording(prompt, num_images, variant="edit-plus"):
        seen.append(variant)
        return original(prompt, num_images, variant)

    monkeypatch.setattr(text_encoder, "format_edit_prompt", recording)
    monkeypatch.setattr(qwen_image, "EDIT_VAE_AREA", SIZE * SIZE)
    options = dict(height=SIZE, width=SIZE, num_inference_steps=2, seed=0, cfg_scale=1.0)
    plus = pixels(edit_pipe(PROMPT, edit_image=picture(1, 64, 64), **options))
    monkeypatch.setattr(edit_pipe, "edit_variant", "edit")
    single = pixels(edit_pipe(PROMPT, edit_image=picture(1, 64, 64), **options))
    assert seen == ["edit-plus", "edit"]
    assert np.abs(single - plus).mean() > 0.5  # another template, another image
    with pytest.raises(ValueError, match="2 images, but the original Qwen-Image-Edit takes one"):
        edit_pipe(PROMPT, edit_image=[picture(1, 64, 64), picture(2, 64, 64)], **options)


def test_edit_images_are_checked(edit_pipe):
    options = dict(height=SIZE, width=SIZE, num_inference_steps=1, seed=0)
    with pytest.raises(ValueError, match=r"edit_image\[1\] is a str \('b.png'\), not a PIL image"):
        edit_pipe(PROMPT, edit_image=[picture(1, 64, 64), "b.png"], **options)
    with pytest.raises(ValueError, match="edit_image is a Tensor"):
        edit_pipe(PROMPT, edit_image=torch.zeros(3, 64, 64), **options)
