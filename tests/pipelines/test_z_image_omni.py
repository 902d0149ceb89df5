"""ZImagePipeline's ``edit_image`` on an Omni-Base DiT against diffusers' ZImageOmniPipeline on the same tiny
weights (one and two reference images, CFG off and on), and its guards.

The tiny repository is the Z-Image fixture's with an Omni DiT (``siglip_feat_dim`` 24) and ``siglip/model.safetensors``
(a tiny transformers ``Siglip2VisionModel`` saved under ``vision_model.`` as the release is).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ds_models_z_image.family import tiny_image_encoder_config
from ds_models_z_image.image_encoder import build_image_encoder, image_processor
from ds_pipelines.z_image import ZImagePipeline, omni_prompt_segments
from tests.pipelines.z_image_fixtures import tiny_transformer, write_repo

SIZE = 64
SIGLIP_DIM = 24
PROMPT = "put the hat on the cat"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def omni_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("z_image_omni") / "Z-Image-Omni-tiny"
    ns = write_repo(root, seed=70)
    ns.transformer = tiny_transformer(71, siglip_feat_dim=SIGLIP_DIM)
    ns.transformer.save_pretrained(root / "transformer")
    torch.manual_seed(72)
    ns.siglip = build_image_encoder(tiny_image_encoder_config(SIGLIP_DIM))
    with torch.no_grad():
        for name, parameter in ns.siglip.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0, 0.1)
    (root / "siglip").mkdir()
    state = {"vision_model." + k: v.contiguous() for k, v in ns.siglip.state_dict().items()}
    save_file(state, str(root / "siglip" / "model.safetensors"))
    return ns


@pytest.fixture(scope="module")
def pipe(omni_files) -> ZImagePipeline:
    return ZImagePipeline.from_pretrained(omni_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False)


@pytest.fixture(scope="module")
def diffusers_pipe(omni_files):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageOmniPipeline
    from transformers import AutoTokenizer

    theirs = ZImageOmniPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(omni_files.repo / "scheduler"),
        vae=omni_files.vae,
        text_encoder=omni_files.text_encoder,
        tokenizer=AutoTokenizer.from_pretrained(omni_files.repo / "tokenizer"),
        transformer=omni_files.transformer,
        siglip=omni_files.siglip,
        siglip_processor=image_processor(max_num_patches=16),
    )
    theirs.set_progress_bar_config(disable=True)
    return theirs


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth picture (a colour gradient with a blob); diffusers wants at least 64 pixels a side."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([x, y, 1 - x * y], axis=-1) * 200 + g.uniform(0, 40, 3)
    blob = np.exp(-(((x - g.uniform(0.2, 0.8)) ** 2 + (y - 0.4) ** 2) / 0.02))[..., None] * 60
    return Image.fromarray(np.clip(base + blob, 0, 255).astype(np.uint8))


def noise_for(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def reference(diffusers_pipe, monkeypatch, images, noise, guidance_scale, steps):
    # diffusers encodes the references as image.bfloat16(); the fp32 test VAE takes them back to float32.
    vae = diffusers_pipe.vae
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x, *a, **k: encode(x.float(), *a, **k))
    with torch.no_grad():
        out = diffusers_pipe(
            image=images,
            prompt=PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=noise.clone(),
            output_type="pt",
        ).images
    return (out[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()


CASES = {
    "one-image-no-cfg": ([(80, 64)], 1.0),
    "one-image-cfg": ([(64, 96)], 3.0),
    "two-images-cfg": ([(80, 64), (64, 64)], 2.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_edit_matches_diffusers_omni(pipe, diffusers_pipe, monkeypatch, name):
    sizes, cfg_scale = CASES[name]
    images = [picture(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    noise = noise_for(3)
    expected = reference(diffusers_pipe, monkeypatch, images, noise, cfg_scale - 1, 3)
    ours = pipe(
        PROMPT,
        edit_image=images if len(images) > 1 else images[0],
        cfg_scale=cfg_scale,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        noise=noise,
    )
    got = np.asarray(ours).astype(np.int16)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1


def test_references_change_the_image(pipe):
    noise = noise_for(4)
    kwargs = dict(cfg_scale=1.0, height=SIZE, width=SIZE, num_inference_steps=2, noise=noise)
    a = np.asarray(pipe(PROMPT, edit_image=picture(64, 48, 1), **kwargs)).astype(np.int16)
    b = np.asarray(pipe(PROMPT, edit_image=picture(64, 48, 2), **kwargs)).astype(np.int16)
    assert np.abs(a - b).max() > 1


def test_size_defaults_to_the_last_reference(pipe):
    image = pipe(PROMPT, edit_image=[picture(64, 64, 1), picture(56, 40, 2)], num_inference_steps=1, cfg_scale=1.0)
    assert image.size == (48, 32)  # 56x40 centre-cropped to multiples of 16


def test_omni_template():
    assert omni_prompt_segments("p", 0) == ["<|im_start|>user\np<|im_end|>\n<|im_start|>assistant\n"]
    two = omni_prompt_segments("p", 2)
    assert len(two) == 4 and two[0].endswith("<|vision_start|>") and two[-1] == "<|vision_end|><|im_end|>"


def test_edit_image_guards(pipe, z_image_pipe_plain):
    with pytest.raises(ValueError, match="PIL image"):
        pipe(PROMPT, edit_image=[], num_inference_steps=1)
    with pytest.raises(ValueError, match="Omni-Base"):
        z_image_pipe_plain(PROMPT, edit_image=picture(32, 32, 0), num_inference_steps=1)


@pytest.fixture(scope="module")
def z_image_pipe_plain(tmp_path_factory):
    ns = write_repo(tmp_path_factory.mktemp("z_image_plain") / "Z-Image-tiny", seed=80)
    return ZImagePipeline.from_pretrained(ns.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False)
