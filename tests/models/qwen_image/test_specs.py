"""Qwen-Image's schedules against diffusers' FlowMatchEulerDiscreteScheduler with the released scheduler config,
the presets as data, LoRA names against diffusers' own Qwen LoRA conversion and PEFT module names, and the specs
the package registers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from torch import nn

from ds_loader import ModelSpec
from ds_loader.families import LoraTarget
from ds_models_core.schedules import flow_match_sigmas
from ds_models_qwen_image import SCHEDULES, SPECS, QwenImageDiT, QwenImageDiTConfig
from ds_models_qwen_image.lora import (
    LORA_SIGN,
    diffusers_lora_names,
    diffusers_lora_target,
    layer_from_flat,
)
from ds_models_qwen_image.presets import (
    COMPONENTS,
    CONTROLNETS,
    LIGHTNING_LORAS,
    PRESETS,
    QwenImagePreset,
    get_preset,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Qwen/Qwen-Image/scheduler/scheduler_config.json
QWEN_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),  # unused with use_dynamic_shifting: the pipeline passes mu
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
# lightx2v/Qwen-Image-Lightning's scheduler config for its distilled LoRAs (the model card's example)
LIGHTNING_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def diffusers_sigmas(config: dict, steps: int, tokens: int, base_shift: float, max_shift: float) -> np.ndarray:
    """Sigmas as diffusers' QwenImagePipeline sets them: linspace(1, 1/N, N) and mu from the image token count."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(tokens, 256, 8192, base_shift, max_shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.double().numpy()


@pytest.mark.parametrize("steps", [2, 4, 8, 30, 50])
@pytest.mark.parametrize(("height", "width"), [(1328, 1328), (1664, 928), (512, 512), (256, 256), (2048, 2048)])
def test_qwen_image_schedule_matches_diffusers(steps, height, width):
    tokens = (height // 16) * (width // 16)
    expected = diffusers_sigmas(QWEN_SCHEDULER, steps, tokens, 0.5, 0.9)
    ours = flow_match_sigmas(SCHEDULES["qwen-image"], steps, image_sequence_length=tokens).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)
    assert ours[-2] == pytest.approx(0.02)  # the terminal stretch


def test_one_step_is_sigma_one():
    """diffusers' stretch divides by zero on a one-point grid at sigma 1 (NaN); ours leaves it as is."""
    with np.errstate(invalid="ignore"):
        assert np.isnan(diffusers_sigmas(QWEN_SCHEDULER, 1, 4096, 0.5, 0.9)[0])
    assert flow_match_sigmas(SCHEDULES["qwen-image"], 1, image_sequence_length=4096).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("tokens", [256, 6889, 8192])
def test_lightning_schedule_matches_diffusers(steps, tokens):
    expected = diffusers_sigmas(LIGHTNING_SCHEDULER, steps, tokens, math.log(3), math.log(3))
    ours = flow_match_sigmas(SCHEDULES["qwen-image-lightning"], steps, image_sequence_length=tokens).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-6)


def test_schedule_needs_the_token_count():
    with pytest.raises(ValueError, match="image sequence length"):
        flow_match_sigmas(SCHEDULES["qwen-image"], 8)


# --- presets ---------------------------------------------------------------------------------------------------


def test_presets():
    assert list(PRESETS) == [
        "qwen-image",
        "qwen-image-2512",
        "qwen-image-edit",
        "qwen-image-edit-2509",
        "qwen-image-edit-2511",
    ]
    for name, preset in PRESETS.items():
        assert set(COMPONENTS) <= set(preset.files)
        assert preset.files["dit"].pattern == "transformer/*.safetensors"
        assert preset.files["text_encoder"].model_id == "Qwen/Qwen-Image"
        assert preset.model_id.startswith("Qwen/Qwen-Image")
        assert preset.sampling["cfg_scale"] == 4.0 and preset.sampling["schedule"] in SCHEDULES
        config = QwenImageDiTConfig.preset(preset.dit_config)
        assert config.zero_cond_t == (name == "qwen-image-edit-2511")
        edit = name.startswith("qwen-image-edit")
        assert ("processor" in preset.files) == edit
        assert (preset.edit_variant is not None) == edit and ("height" not in preset.sampling) == edit
    assert PRESETS["qwen-image-edit"].edit_variant == "edit"
    assert PRESETS["qwen-image-edit-2509"].edit_variant == "edit-plus"
    assert PRESETS["qwen-image"].sampling == {
        "num_inference_steps": 50,
        "cfg_scale": 4.0,
        "schedule": "qwen-image",
        "height": 1328,
        "width": 1328,
    }
    assert PRESETS["qwen-image-edit-2511"].sampling["num_inference_steps"] == 40
    assert get_preset("Qwen/Qwen-Image-Edit-2509") is PRESETS["qwen-image-edit-2509"]
    assert get_preset(" QWEN-IMAGE ") is PRESETS["qwen-image"]
    with pytest.raises(ValueError, match="unknown Qwen-Image preset"):
        get_preset("qwen-image-layered")


def test_preset_checks_its_files():
    files = dict(PRESETS["qwen-image"].files)
    with pytest.raises(ValueError, match="edit model needs the VL processor"):
        QwenImagePreset("x", files, edit_variant="edit")
    with pytest.raises(ValueError, match="edit_variant='plus'"):
        QwenImagePreset("x", files | {"processor": files["tokenizer"]}, edit_variant="plus")
    del files["vae"]
    with pytest.raises(ValueError, match="files must name"):
        QwenImagePreset("x", files)


def test_extras():
    assert {extra.kind for extra in CONTROLNETS.values()} == {"blockwise-controlnet", "controlnet-union"}
    assert CONTROLNETS["blockwise-inpaint"].file.model_id == "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Inpaint"
    for extra in [*CONTROLNETS.values(), *LIGHTNING_LORAS.values()]:
        assert set(extra.presets) <= set(PRESETS) and extra.file.pattern.endswith(".safetensors")
    for lora in LIGHTNING_LORAS.values():
        assert lora.sampling["schedule"] == "qwen-image-lightning" and lora.sampling["cfg_scale"] == 1.0
        assert str(lora.sampling["num_inference_steps"]) + "steps" in lora.file.pattern


# --- LoRA names ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layers() -> list[str]:
    dit = QwenImageDiT(QwenImageDiTConfig.tiny())
    return [name for name, module in dit.named_modules() if isinstance(module, nn.Linear)]


def test_every_linear_layer_round_trips(layers):
    assert len(layers) == 6 + 2 * 14
    for layer in layers:
        assert diffusers_lora_names(layer) == [layer]
        assert diffusers_lora_target(layer) == LoraTarget(layer)
        assert layer_from_flat(layer.replace(".", "_")) == layer
        if layer.startswith("transformer_blocks."):
            for name in (layer, "lora_unet_" + layer.replace(".", "_"), "transformer." + layer):
                assert LORA_SIGN.search(name), name
    assert diffusers_lora_target("transformer_blocks.0.norm1.linear") is None
    assert layer_from_flat("transformer_blocks_0_attn_to_x") is None and layer_from_flat("double_blocks_0") is None


def test_peft_module_names_on_diffusers_are_ours(layers):
    """A PEFT LoRA on diffusers' QwenImageTransformer2DModel targets modules whose names are our layers."""
    config = QwenImageDiTConfig.tiny()
    with torch.device("meta"):
        reference = QwenImageTransformer2DModel(
            patch_size=config.patch_size,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            num_layers=config.num_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.joint_attention_dim,
            axes_dims_rope=config.axes_dims_rope,
        )
    theirs = [name for name, module in reference.named_modules() if isinstance(module, nn.Linear)]
    assert sorted(theirs) == sorted(layers)


def test_kohya_names_read_as_diffusers_does(layers):
    """musubi-tuner / kohya flat names, and ComfyUI's diffusion_model. names, become the module names diffusers'
    own converter gives them."""
    rank = 2
    kohya = {}
    for layer in layers:
        flat = "lora_unet_" + layer.replace(".", "_")
        kohya[f"{flat}.lora_down.weight"] = torch.zeros(rank, 4)
        kohya[f"{flat}.lora_up.weight"] = torch.zeros(4, rank)
        kohya[f"{flat}.alpha"] = torch.tensor(float(rank))
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(dict(kohya))
    modules = {key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in converted if "lora_A" in key}
    ours = {layer_from_flat(key.split(".")[0].removeprefix("lora_unet_")) for key in kohya}
    assert modules == ours == set(layers)
    comfy = {f"diffusion_model.{layer}.lora_down.weight": torch.zeros(rank, 4) for layer in layers}
    comfy |= {f"diffusion_model.{layer}.lora_up.weight": torch.zeros(4, rank) for layer in layers}
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(comfy)
    assert {
        key.removeprefix("transformer.").removesuffix(".lora_A.weight") for key in converted if "lora_A" in key
    } == (set(layers))


def test_sign_leaves_other_families_alone():
    for name in (
        "double_blocks.0.img_attn.qkv",  # FLUX.1 (BFL)
        "single_transformer_blocks.3.attn.to_q",  # FLUX.1 (diffusers)
        "lora_unet_single_transformer_blocks_3_proj_out",
        "transformer_blocks.0.ff.net.0.proj",  # FLUX.1 diffusers feed-forward
        "blocks.0.self_attn.q",  # Wan
        "layers.0.attention.to_q",  # Z-Image
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
    ):
        assert not LORA_SIGN.search(name), name


# --- specs ---------------------------------------------------------------------------------------------------


def test_specs():
    assert all(isinstance(spec, ModelSpec) and spec.family == "qwen-image" for spec in SPECS)
    assert {spec.name for spec in SPECS} == {
        "qwen-image.dit",
        "qwen-image.text_encoder",
        "qwen-image.blockwise_controlnet",
        "qwen-image.controlnet_union",
    }
