"""The folder the docs' code runs in: tiny random-weight models where the presets look for them, a LoRA file, an
input image, a four-image dataset, a Z-Image ControlNet file with a pose map and an inpaint mask, and pipeline and
training calls shrunk to a CPU-sized run."""

from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ds_vram import read_safetensors_header
from tests.examples.qwen_image_controlnets import write_tiny_blockwise
from tests.pipelines.conftest import flux_files  # noqa: F401  (session fixtures, re-exported)
from tests.pipelines.qwen_image_fixtures import qwen_image_files  # noqa: F401
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401
from tests.pipelines.z_image_controlnet_fixtures import write_tiny_controlnet
from tests.pipelines.z_image_fixtures import z_image_files  # noqa: F401

# Keyword arguments each pipeline call is clamped to: the code runs as written, at a size a CPU does in seconds.
SHRINK = {
    "FluxImagePipeline": {"height": 64, "width": 64, "num_inference_steps": 2},
    "WanVideoPipeline": {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2},
    "ZImagePipeline": {"height": 64, "width": 64, "num_inference_steps": 2},
    "QwenImagePipeline": {"height": 32, "width": 32, "num_inference_steps": 2},
}
# TrainingConfig fields each train() call is clamped to.
TRAIN_SHRINK = {"steps": 2, "height": 32, "width": 32}
# Local folders the Wan page loads, in the diffusers layout of the repositories of the same names.
WAN_FOLDERS = {"Wan2.1-T2V-1.3B-Diffusers": "t2v", "Wan2.1-I2V-14B-480P-Diffusers": "i2v"}
# Preset repositories whose DiT is a dev-shaped FLUX.1 file: the tiny dev DiT stands in for each.
FLUX_DIT_VARIANTS = {
    "FLUX.1-Krea-dev": "flux1-krea-dev.safetensors",
    "FLUX.1-Kontext-dev": "flux1-kontext-dev.safetensors",
}


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=target.is_dir())


def _style_lora(dit_file: Path, path: Path) -> None:
    """A ComfyUI-format LoRA (lora_down/lora_up/alpha) on two of the tiny DiT's layers, strong enough to show."""
    shapes = {key: info.shape for key, info in read_safetensors_header(dit_file)[0].items()}
    generator = torch.Generator().manual_seed(5)
    state = {}
    for layer in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"):
        out_features, in_features = shapes[f"{layer}.weight"]
        state[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(4, in_features, generator=generator)
        state[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(out_features, 4, generator=generator) * 0.1
        state[f"diffusion_model.{layer}.alpha"] = torch.tensor(4.0)
    save_file(state, path, metadata={"ss_network_dim": "4", "ss_network_alpha": "4"})


@pytest.fixture(scope="session")
def docs_models(flux_files, wan_files, z_image_files, qwen_image_files, tmp_path_factory) -> SimpleNamespace:  # noqa: F811
    """``DIFFSYNTH_MODEL_BASE_PATH`` contents: each preset's repository id, holding tiny files in its layout."""
    root = tmp_path_factory.mktemp("docs_models")
    base = root / "models"
    bfl = flux_files.bfl_repo
    _link(bfl, base / "black-forest-labs" / "FLUX.1-dev")
    for repository, file in FLUX_DIT_VARIANTS.items():
        _link(bfl / "flux1-dev.safetensors", base / "black-forest-labs" / repository / file)
    for repository in ("Z-Image-Turbo", "Z-Image"):  # the tiny repository holds every file both presets read
        _link(z_image_files.repo, base / "Tongyi-MAI" / repository)
    # Qwen-Image: the tiny repositories where each preset reads its files (the Edit models' processor/ and 2509's
    # transformer/ from the tiny edit repository), and a tiny blockwise Canny ControlNet under its release's id.
    _link(qwen_image_files.repo, base / "Qwen" / "Qwen-Image")
    for repository in ("Qwen-Image-Edit", "Qwen-Image-Edit-2509"):
        _link(qwen_image_files.edit_repo, base / "Qwen" / repository)
    write_tiny_blockwise(base / "DiffSynth-Studio" / "Qwen-Image-Blockwise-ControlNet-Canny" / "model.safetensors")
    controlnet = write_tiny_controlnet(root)  # the tiny Union 2.1, where its ModelScope id and file name put it
    _link(controlnet, base / "PAI" / "Z-Image-Turbo-Fun-Controlnet-Union-2.1" / controlnet.name)
    lora = root / "style.safetensors"
    _style_lora(bfl / "flux1-dev.safetensors", lora)
    photo = root / "photo.png"
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(photo)
    pose = root / "pose.png"
    Image.radial_gradient("L").resize((64, 64)).convert("RGB").save(pose)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # white = repaint: the left half
    mask.save(root / "mask.png")
    dataset = root / "my-dataset"
    dataset.mkdir()
    for index, color in enumerate(("red", "green", "blue", "white")):
        Image.new("RGB", (32, 32), color).save(dataset / f"{index}.png")
        (dataset / f"{index}.txt").write_text(f"[trigger], a {color} square")
    wan = {folder: getattr(wan_files, name) for folder, name in WAN_FOLDERS.items()}
    return SimpleNamespace(
        base=base,
        lora=lora,
        photo=photo,
        pose=pose,
        mask=root / "mask.png",
        controlnet=controlnet,
        dataset=dataset,
        wan=wan,
    )


def _shrunk(call, limits: dict[str, int]):
    @functools.wraps(call)
    def shrunk_call(self, *args, **kwargs):
        for key, limit in limits.items():
            kwargs[key] = min(kwargs.get(key, limit), limit)
        return call(self, *args, **kwargs)

    return shrunk_call


def _shrunk_train(train):
    @functools.wraps(train)
    def shrunk_train(config, *args, **kwargs):
        # Unset sizes (the family's default) and frame counts are clamped too; an unset frame count stays unset.
        changes = {
            key: limit if getattr(config, key) is None else min(getattr(config, key), limit)
            for key, limit in TRAIN_SHRINK.items()
        }
        if config.num_frames is not None:
            changes["num_frames"] = min(config.num_frames, 5)
        return train(dataclasses.replace(config, **changes), *args, **kwargs)

    return shrunk_train


@pytest.fixture
def docs_sandbox(docs_models, tmp_path, monkeypatch) -> Path:
    """A fresh working folder for one page's code, with downloads off and pipeline calls shrunk."""
    import ds_pipelines

    shutil.copy(docs_models.lora, tmp_path / "style.safetensors")
    shutil.copy(docs_models.photo, tmp_path / "photo.png")
    shutil.copy(docs_models.pose, tmp_path / "pose.png")
    shutil.copy(docs_models.mask, tmp_path / "mask.png")
    _link(docs_models.controlnet, tmp_path / docs_models.controlnet.name)
    shutil.copytree(docs_models.dataset, tmp_path / "my-dataset")
    for folder, repository in docs_models.wan.items():
        _link(repository, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(docs_models.base))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
    monkeypatch.setenv("NO_COLOR", "1")
    for name, limits in SHRINK.items():
        pipeline = getattr(ds_pipelines, name, None)
        if pipeline is not None:
            monkeypatch.setattr(pipeline, "__call__", _shrunk(pipeline.__call__, limits))
    import ds_train

    monkeypatch.setattr(ds_train, "train", _shrunk_train(ds_train.train))
    return tmp_path


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Every test here starts and ends without accelerate state (see tests/conftest.py)."""
