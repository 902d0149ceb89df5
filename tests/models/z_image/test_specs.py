"""Detection and lazy conversion of the Z-Image DiT formats, the presets, the LoRA names and the schedule."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from ds_loader import DetectionError, detect, find_preset, get_family, load_model
from ds_models_core import flow_match_sigmas
from ds_models_z_image import PRESETS, SCHEDULES, ZImageDiT, ZImageDiTConfig, get_preset
from ds_models_z_image.specs import detect_dit
from ds_vram import TensorInfo

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ZImageDiTConfig.tiny()
PREFIX = "model.diffusion_model."


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    model = ZImageDiT(TINY)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    return {key: value.contiguous() for key, value in model.state_dict().items()}


def to_comfyui(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Our (official) state dict in ComfyUI's NextDiT layout: fused qkv, out, q_norm/k_norm, x_embedder,
    final_layer."""
    out = {}
    for key, value in state.items():
        if re.search(r"\.attention\.to_[kv]\.weight$", key):
            continue
        if key.endswith(".attention.to_q.weight"):
            block = key.removesuffix(".attention.to_q.weight")
            parts = [state[f"{block}.attention.to_{p}.weight"] for p in "qkv"]
            out[f"{prefix}{block}.attention.qkv.weight"] = torch.cat(parts)
            continue
        key = key.replace("all_x_embedder.2-1.", "x_embedder.").replace("all_final_layer.2-1.", "final_layer.")
        key = key.replace(".attention.to_out.0.", ".attention.out.")
        key = key.replace(".attention.norm_q.", ".attention.q_norm.").replace(
            ".attention.norm_k.", ".attention.k_norm."
        )
        out[prefix + key] = value
    return out


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


def _inputs():
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 16, 8, 8, generator=generator)
    text = torch.randn(1, 9, TINY.cap_feat_dim, generator=generator)
    return latents, torch.tensor([0.4]), text


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("official", "official"),
        ("prefixed", "prefixed"),
        ("comfyui", "comfyui"),
        ("comfyui-prefixed", "comfyui"),
        ("official-fp8", "official-fp8"),
        ("comfyui-prefixed-fp8", "comfyui-fp8"),
    ],
)
def test_each_format_loads_to_the_same_model(tiny_state, tmp_path, layout, expected):
    state = dict(tiny_state)
    if layout.startswith("comfyui"):
        state = to_comfyui(state, PREFIX if "prefixed" in layout else "")
        state[(PREFIX if "prefixed" in layout else "") + "norm_final.weight"] = torch.ones(TINY.dim)
    elif layout == "prefixed":
        state = {PREFIX + key: value for key, value in state.items()}
    fp8 = layout.endswith("fp8")
    if fp8:
        state = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}
    path = _save(state, tmp_path / "z_image.safetensors")
    [match] = detect(path)
    assert match.spec.name == "z-image.dit" and match.format == expected and match.config == TINY
    model = load_model(path, torch_dtype=torch.float32).eval()
    reference = ZImageDiT(TINY).eval()
    exact = {
        k: (v.to(torch.float8_e4m3fn).to(torch.bfloat16).float() if fp8 and v.ndim == 2 else v)
        for k, v in tiny_state.items()
    }
    reference.load_state_dict(exact)
    with torch.no_grad():
        torch.testing.assert_close(model(*_inputs()), reference(*_inputs()))


def test_our_comfyui_layout_is_the_one_diffusers_converts(tiny_state):
    """The ComfyUI layout these tests write is what diffusers' single-file converter reads: it gives back the
    official names."""
    comfy = to_comfyui(tiny_state, PREFIX)
    converted = convert_z_image_transformer_checkpoint_to_diffusers(dict(comfy))
    assert set(converted) == set(tiny_state)
    for key, value in converted.items():
        torch.testing.assert_close(value, tiny_state[key])


class _ShapesView:
    """A HeaderView stand-in over key shapes (bf16)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], config_json=None):
        self._shapes = shapes
        self.config_json = config_json

    def keys(self):
        return iter(self._shapes)

    def __iter__(self):
        return iter(self._shapes)

    def __contains__(self, key):
        return key in self._shapes

    def __len__(self):
        return len(self._shapes)

    def shape(self, key):
        return self._shapes[key]

    def info(self, key):
        return TensorInfo(torch.bfloat16, self._shapes[key])

    def count_blocks(self, prefix):
        indices = {int(k[len(prefix) :].split(".")[0]) for k in self._shapes if k.startswith(prefix)}
        return max(indices) + 1 if indices else 0


@pytest.mark.parametrize("name", ["turbo", "omni-base"])
def test_released_layouts_detect_their_config(name):
    config = ZImageDiTConfig.preset(name)
    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in ZImageDiT(config).state_dict().items()}
    assert detect_dit(_ShapesView(shapes)).config == config
    comfy = {PREFIX + key: value for key, value in shapes.items()}
    assert detect_dit(_ShapesView(comfy)).format == "prefixed"


def test_the_diffusers_config_json_supplies_rope_settings():
    with torch.device("meta"):
        shapes = {key: tuple(value.shape) for key, value in ZImageDiT(TINY).state_dict().items()}
    detection = detect_dit(_ShapesView(shapes, {"rope_theta": 100.0, "axes_dims": [4, 14, 14]}))
    assert detection.config.rope_theta == 100.0 and detection.config.axes_dims == (4, 14, 14)


def test_other_checkpoints_are_not_z_image(tiny_state, tmp_path):
    lumina = {
        key.replace("adaLN_modulation.0", "adaLN_modulation.1"): value for key, value in to_comfyui(tiny_state).items()
    }
    assert "Lumina-2" in detect_dit(_ShapesView({k: tuple(v.shape) for k, v in lumina.items()})).reason
    path = _save({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, tmp_path / "other.safetensors")
    with pytest.raises(DetectionError):
        [match for match in detect(path) if match.spec.name == "z-image.dit"]


# ---------------------------------------------------------------------------------------------- presets
def test_presets():
    assert set(PRESETS) == {"z-image-turbo", "z-image", "z-image-omni-base"}
    turbo = get_preset("Tongyi-MAI/Z-Image-Turbo")
    assert turbo is PRESETS["z-image-turbo"] and find_preset("z-image-turbo") == (get_family("z-image"), turbo)
    assert turbo.sampling["num_inference_steps"] == 8 and turbo.sampling["cfg_scale"] == 1.0
    base = PRESETS["z-image"]
    assert base.sampling["num_inference_steps"] == 50 and base.sampling["cfg_scale"] == 4.0
    for preset in PRESETS.values():
        assert preset.files["dit"].pattern == "transformer/*.safetensors"
        assert preset.files["vae"].pattern == "vae/diffusion_pytorch_model.safetensors"
        assert preset.sampling["sigma_shift"] == 3.0 and preset.sampling["height"] == preset.sampling["width"] == 1024
    assert PRESETS["z-image-omni-base"].model_id == "Tongyi-MAI/Z-Image-Omni-Base"
    with pytest.raises(ValueError, match="unknown Z-Image preset"):
        get_preset("z-image-xl")


# ---------------------------------------------------------------------------------------------- LoRA names
def test_lora_names():
    naming = get_family("z-image").lora
    assert naming.to_diffusers("layers.3.attention.to_out.0") == ["layers.3.attention.to_out.0"]
    assert naming.from_diffusers("noise_refiner.1.feed_forward.w2").layer == "noise_refiner.1.feed_forward.w2"
    assert naming.to_diffusers("layers.3.attention_norm1") is None
    assert naming.from_flat("layers_12_attention_to_out_0") == "layers.12.attention.to_out.0"
    assert naming.from_flat("context_refiner_0_feed_forward_w3") == "context_refiner.0.feed_forward.w3"
    assert naming.from_flat("all_final_layer_2-1_adaLN_modulation_1") == "all_final_layer.2-1.adaLN_modulation.1"
    assert naming.from_flat("all_x_embedder_2_1") == "all_x_embedder.2-1"
    assert naming.from_flat("layers_0_self_attn_q_proj") is None
    for name in (
        "layers.0.attention.to_q",
        "lora_unet_noise_refiner_1_attention_to_k",
        "transformer.layers.2.adaLN_modulation.0",
    ):
        assert naming.recognises(name), name
    for name in (
        "double_blocks.0.img_attn.qkv",
        "transformer_blocks.3.attn.to_q",
        "blocks.0.self_attn.q",
        "lora_unet_blocks_0_cross_attn_k",
        "model.layers.0.self_attn.q_proj",  # a Qwen3 text encoder LoRA
        "single_transformer_blocks.1.proj_out",
    ):
        assert not naming.recognises(name), name


# ---------------------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("steps", [8, 9, 50])
def test_schedule_matches_diffusers_and_the_official_pipeline(steps):
    """diffusers' ZImagePipeline: sigmas = linspace(1, 1/N, N) through FlowMatchEulerDiscreteScheduler with
    Z-Image-Turbo's scheduler_config (shift 3, static), then a terminal 0; the official pipeline's linspace(1, 0,
    N+1)[:-1] is the same grid."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist(), device="cpu")
    ours = flow_match_sigmas(SCHEDULES["z-image"], steps)
    assert ours.shape == (steps + 1,) and ours[-1] == 0
    np.testing.assert_allclose(ours.numpy(), scheduler.sigmas.double().numpy(), rtol=1e-6, atol=1e-6)
    # the model's t is 1 - sigma, as diffusers computes it from its timesteps: (1000 - t) / 1000
    model_t = (1000 - scheduler.timesteps.double()) / 1000
    np.testing.assert_allclose((1 - ours[:-1]).numpy(), model_t.numpy(), rtol=1e-5, atol=1e-5)
