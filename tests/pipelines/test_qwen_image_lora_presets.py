"""QwenImagePipeline with LoRA files (written by ``lora_io`` in the diffusers, ComfyUI and kohya forms; hot or fused)
against diffusers' ``load_lora_weights``, and loading from presets (call defaults, the edit template and Edit-2511's
``zero_cond_t`` from the preset when its files carry no ``config.json``)."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ds_pipelines.lora_io import save_lora_file
from ds_pipelines.qwen_image import QwenImagePipeline, pack_latents
from tests.pipelines.qwen_image_fixtures import diffusers_pipeline, qwen_image_files  # noqa: F401

SIZE = 64
PROMPT = "the cat and the hat"
LAYERS = (
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.add_k_proj",
    "transformer_blocks.1.attn.to_out.0",
    "transformer_blocks.1.img_mlp.net.0.proj",
    "transformer_blocks.0.txt_mlp.net.2",
    "transformer_blocks.1.img_mod.1",
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


def lora_layers(pipe: QwenImagePipeline, rank: int = 4, alpha: float = 2.0) -> dict:
    generator = torch.Generator().manual_seed(11)
    layers = {}
    for name in LAYERS:
        weight = pipe.dit.get_submodule(name).weight
        down = torch.randn(rank, weight.shape[1], generator=generator) / weight.shape[1] ** 0.5
        up = torch.randn(weight.shape[0], rank, generator=generator)
        layers[name] = (down, up, alpha)
    return layers


def new_pipe(repo) -> QwenImagePipeline:
    return QwenImagePipeline.from_pretrained(repo, torch_dtype=torch.float32, device="cpu", progress_bar=False)


def generate(pipe: QwenImagePipeline, noise: torch.Tensor) -> np.ndarray:
    image = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=3, noise=noise, cfg_scale=2.0)
    return np.asarray(image).astype(np.int16)


def test_lora_files_mean_the_same_here_and_in_diffusers(qwen_image_files, tmp_path):  # noqa: F811
    pipe = new_pipe(qwen_image_files.repo)
    noise = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(4))
    before = generate(pipe, noise)
    layers = lora_layers(pipe)
    paths = {
        form: save_lora_file(layers, tmp_path / f"lora-{form}.safetensors", format=form, family="qwen-image")
        for form in ("diffusers", "comfyui", "kohya")
    }
    pipe.load_lora(paths["comfyui"])
    hot = generate(pipe, noise)
    assert np.abs(hot - before).mean() > 1  # the LoRA changes the image
    for form in ("diffusers", "kohya"):
        pipe.clear_lora()
        pipe.load_lora(paths[form])
        assert np.abs(generate(pipe, noise) - hot).max() <= 1, form
    pipe.clear_lora()
    assert np.array_equal(generate(pipe, noise), before)  # hot-loaded LoRAs come off

    fused = new_pipe(qwen_image_files.repo)
    fused.load_lora(paths["diffusers"], fuse=True)
    assert np.abs(generate(fused, noise) - hot).max() <= 1

    # diffusers' own pipeline on a copy of the same weights, with the diffusers-format file.
    theirs = diffusers_pipeline(qwen_image_files, transformer=copy.deepcopy(qwen_image_files.transformer))
    theirs.load_lora_weights(str(paths["diffusers"]), adapter_name="ours")
    with torch.no_grad():
        images = theirs(
            PROMPT,
            negative_prompt="",
            true_cfg_scale=2.0,
            height=SIZE,
            width=SIZE,
            num_inference_steps=3,
            latents=pack_latents(noise.clone()),
            output_type="pt",
        ).images
    expected = (images[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()
    assert np.abs(hot - expected).max() <= 1, np.abs(hot - expected).max()


# ---------------------------------------------------------------------------------------------- presets
@pytest.fixture
def preset_models(qwen_image_files, tmp_path, monkeypatch):  # noqa: F811
    """The tiny repositories where the presets look for Qwen's releases. Edit-2511's DiT is the Edit-2509 one,
    without zero_cond_t in its config.json: the preset alone must say it."""
    base = tmp_path / "models" / "Qwen"
    base.mkdir(parents=True)
    links = {
        "Qwen-Image": qwen_image_files.repo,
        "Qwen-Image-Edit": qwen_image_files.edit_repo,
        "Qwen-Image-Edit-2509": qwen_image_files.edit_repo,
    }
    for name, target in links.items():
        (base / name).symlink_to(target, target_is_directory=True)
    plain = base / "Qwen-Image-Edit-2511" / "transformer"
    plain.mkdir(parents=True)
    for file in (qwen_image_files.edit_repo / "transformer").glob("*.safetensors"):
        shutil.copy(file, plain / file.name)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(base.parent))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    return base


@pytest.mark.parametrize(
    ("preset", "steps", "variant", "zero_cond_t"),
    [
        ("qwen-image", 50, "edit-plus", False),
        ("qwen-image-edit", 50, "edit", False),
        ("qwen-image-edit-2509", 40, "edit-plus", False),
        ("qwen-image-edit-2511", 40, "edit-plus", True),
    ],
)
def test_presets_set_defaults_edit_template_and_zero_cond_t(
    preset_models, monkeypatch, preset, steps, variant, zero_cond_t
):
    import ds_pipelines.qwen_image as qwen_image

    monkeypatch.setattr(qwen_image, "EDIT_VAE_AREA", SIZE * SIZE)  # about 1 MP in the release; tiny here
    monkeypatch.setattr(qwen_image, "EDIT_VL_AREA", SIZE * SIZE)
    loaded = QwenImagePipeline.from_pretrained(preset, torch_dtype=torch.float32, device="cpu", progress_bar=False)
    assert loaded.preset.name == preset and loaded.edit_variant == variant
    assert loaded.sampling_defaults["num_inference_steps"] == steps
    assert loaded.sampling_defaults["cfg_scale"] == 4.0
    assert loaded.dit.config.zero_cond_t is zero_cond_t
    if "edit" in preset:
        image = loaded(
            PROMPT, edit_image=Image.new("RGB", (SIZE, SIZE)), height=SIZE, width=SIZE, num_inference_steps=1
        )
    else:
        image = loaded(PROMPT, height=SIZE, width=SIZE, num_inference_steps=1)
    recorded = json.loads(image.info["diffsynth"])
    assert recorded["cfg_scale"] == 4.0 and recorded["schedule"] == "qwen-image"


def _published_layouts(layers: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The key layouts Qwen-Image LoRAs are published in, besides those lora_io writes (diffusers' Qwen converter,
    ``_convert_non_diffusers_qwen_lora_to_diffusers``, reads each): dotted names with kohya's down/up and an alpha
    (lightx2v's Lightning files), ComfyUI's ``diffusion_model.`` with peft's A/B and an alpha, and peft's adapter
    names (``.default.``) as a training script saves them."""
    layouts: dict[str, dict[str, torch.Tensor]] = {"down-up": {}, "comfyui-a-b": {}, "peft-default": {}}
    for name, (down, up, alpha) in layers.items():
        rank = down.shape[0]
        layouts["down-up"] |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha),
        }
        layouts["comfyui-a-b"] |= {
            f"diffusion_model.{name}.lora_A.weight": down,
            f"diffusion_model.{name}.lora_B.weight": up,
            f"diffusion_model.{name}.alpha": torch.tensor(alpha),
        }
        # No alpha: peft's scale comes from its adapter config; here alpha / rank is folded into B instead.
        layouts["peft-default"] |= {
            f"{name}.lora_A.default.weight": down,
            f"{name}.lora_B.default.weight": up * (alpha / rank),
        }
    return layouts


@pytest.mark.parametrize("layout", ["down-up", "comfyui-a-b", "peft-default"])
def test_published_lora_layouts_load_as_in_diffusers(qwen_image_files, tmp_path, layout):  # noqa: F811
    from safetensors.torch import save_file

    pipe = new_pipe(qwen_image_files.repo)
    noise = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(4))
    before = generate(pipe, noise)
    tensors = _published_layouts(lora_layers(pipe))[layout]
    path = tmp_path / f"{layout}.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    pipe.load_lora(path)
    ours = generate(pipe, noise)
    assert np.abs(ours - before).mean() > 1  # the LoRA is applied

    theirs = diffusers_pipeline(qwen_image_files, transformer=copy.deepcopy(qwen_image_files.transformer))
    theirs.load_lora_weights(str(path), adapter_name="published")
    with torch.no_grad():
        images = theirs(
            PROMPT,
            negative_prompt="",
            true_cfg_scale=2.0,
            height=SIZE,
            width=SIZE,
            num_inference_steps=3,
            latents=pack_latents(noise.clone()),
            output_type="pt",
        ).images
    expected = (images[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()
    assert np.abs(ours - expected).max() <= 1, (layout, np.abs(ours - expected).max())
