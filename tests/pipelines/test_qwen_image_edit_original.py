"""QwenImagePipeline with the original Qwen-Image-Edit (``edit_variant`` "edit") against diffusers'
QwenImageEditPipeline on the same tiny components and noise: its single-image template, the one edit image sized at
about 1 MP for both Qwen2.5-VL and the VAE, CFG off and on, with a given output size and with the size taken from the
edit image.

diffusers hard-codes the 1024 * 1024 area in ``QwenImageEditPipeline.__call__`` (through its module-level
``calculate_dimensions``, for the edit image and the default output); we keep it in ``EDIT_VAE_AREA`` (which the
original Edit model also uses for the VL image) and ``OUTPUT_AREA``. At tiny widths a megapixel would make the test
slow, so both sides are lowered to the same small area here: diffusers' ``calculate_dimensions`` is wrapped to ignore
the area it is given, ours through the module constants. Both then size by the same rule (the image's aspect at the
area, multiples of 32), which ``test_edit_dimensions_equal_diffusers`` checks at the real areas.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import ds_pipelines.qwen_image as qwen_image
from ds_pipelines.qwen_image import QwenImagePipeline, pack_latents
from tests.pipelines.qwen_image_fixtures import qwen_image_files, scheduler, tokenizer  # noqa: F401
from tests.pipelines.test_qwen_image_edit import picture, pixels

PROMPT = "put the cat on the sofa"
AREA = 96 * 64  # the edit image's area for Qwen2.5-VL and the VAE, and the default output's (1024 * 1024 released)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


@pytest.fixture(autouse=True)
def small_edit_area(monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as theirs

    original = theirs.calculate_dimensions
    monkeypatch.setattr(theirs, "calculate_dimensions", lambda target_area, ratio: original(AREA, ratio))
    monkeypatch.setattr(qwen_image, "EDIT_VAE_AREA", AREA)
    monkeypatch.setattr(qwen_image, "OUTPUT_AREA", AREA)


@pytest.fixture(scope="module")
def original_edit_repo(qwen_image_files, tmp_path_factory):  # noqa: F811
    """The tiny Edit repository as Qwen/Qwen-Image-Edit lays it out: the same files, a ``QwenImageEditPipeline``
    index (which is how a diffusers folder says the original template)."""
    root = tmp_path_factory.mktemp("qwen_image_edit_original") / "Qwen-Image-Edit-tiny"
    shutil.copytree(qwen_image_files.edit_repo, root, symlinks=True)
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps(index | {"_class_name": "QwenImageEditPipeline"}))
    return root


@pytest.fixture(scope="module")
def edit_pipe(original_edit_repo) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(
        original_edit_repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


def diffusers_edit_pipeline(ns, repo):
    from diffusers import QwenImageEditPipeline

    from ds_models_qwen_image.text_encoder import load_processor

    pipe = QwenImageEditPipeline(
        scheduler=scheduler(ns),
        vae=ns.vae,
        text_encoder=ns.text_encoder,
        tokenizer=tokenizer(ns),
        processor=load_processor(repo / "processor"),
        transformer=ns.edit_transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def noise_for(seed: int, height: int, width: int) -> torch.Tensor:
    return torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def reference(theirs, image, noise: torch.Tensor, size: tuple[int, int] | None, **kwargs) -> np.ndarray:
    sizes = {} if size is None else {"width": size[0], "height": size[1]}
    with torch.no_grad():
        output = theirs(
            image=image,
            prompt=PROMPT,
            latents=pack_latents(noise.clone()),
            output_type="pt",
            num_inference_steps=3,
            **sizes,
            **kwargs,
        ).images
    return (output[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize(
    ("cfg_scale", "size"),
    [(1.0, (64, 64)), (3.0, (64, 64)), (3.0, None)],
    ids=["cfg-off", "cfg-on", "cfg-on-size-from-image"],
)
def test_matches_diffusers_edit_pipeline(qwen_image_files, original_edit_repo, edit_pipe, cfg_scale, size):  # noqa: F811
    assert edit_pipe.edit_variant == "edit"  # from the folder's model_index.json
    image = picture(1, 150, 100)  # resized (LANCZOS) to 96 x 64 on both sides
    width, height = size or (96, 64)
    noise = noise_for(3, height, width)
    sizes = {} if size is None else {"width": width, "height": height}
    options = dict(num_inference_steps=3, noise=noise, cfg_scale=cfg_scale, negative_prompt="blurry", **sizes)
    got = edit_pipe(PROMPT, edit_image=image, **options)
    assert got.size == (width, height)
    theirs = diffusers_edit_pipeline(qwen_image_files, original_edit_repo)
    expected = reference(theirs, image, noise, size, negative_prompt="blurry", true_cfg_scale=cfg_scale)
    assert expected.shape == (height, width, 3)
    ours = pixels(got)
    assert np.abs(ours - expected).max() <= 1, np.abs(ours - expected).max()
    # The edit image matters, and so does the template: the Plus one gives another image.
    changed = np.abs(pixels(edit_pipe(PROMPT, edit_image=picture(7, 150, 100), **options)) - expected)
    assert changed.mean() > 0.3 and changed.max() > 4, (changed.mean(), changed.max())


def test_the_plus_template_differs_from_the_original(edit_pipe, monkeypatch):
    """The parity above would not notice the Plus template if the two gave the same image on these weights."""
    image = picture(2, 150, 100)
    options = dict(width=64, height=64, num_inference_steps=2, noise=noise_for(4, 64, 64), cfg_scale=1.0)
    original = pixels(edit_pipe(PROMPT, edit_image=image, **options))
    monkeypatch.setattr(edit_pipe, "edit_variant", "edit-plus")
    monkeypatch.setattr(qwen_image, "EDIT_VL_AREA", AREA)  # the same VL image: only the template differs
    plus = pixels(edit_pipe(PROMPT, edit_image=image, **options))
    assert np.abs(original - plus).mean() > 0.3
