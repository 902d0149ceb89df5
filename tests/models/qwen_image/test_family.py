"""The Qwen-Image family descriptor: tiny components that run, released components on meta at their published
sizes (each against diffusers' or transformers' own class), and the descriptor's fields."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLForConditionalGeneration

from ds_loader import get_family
from ds_loader.families import schedule_template
from ds_models_qwen_image import QwenImageDiT, WanVAE
from ds_models_qwen_image.family import FAMILY, build_components, build_tiny_components, token_layout
from ds_models_qwen_image.presets import PRESETS
from ds_models_qwen_image.text_encoder import qwen25vl_7b_config

pytestmark = pytest.mark.usefixtures("one_thread")


def count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def test_registered():
    assert get_family("qwen-image") is FAMILY
    assert FAMILY.kind == "image" and FAMILY.default_size == (1328, 1328)
    assert FAMILY.pipeline == "ds_pipelines.qwen_image:QwenImagePipeline"
    for name, template in FAMILY.schedules.items():
        assert schedule_template(name) is template
    for name in FAMILY.diffusers_classes:
        assert hasattr(diffusers, name), name


def test_token_layout():
    layout = token_layout(PRESETS["qwen-image"])
    assert layout.tokens_per_pixel * 1328 * 1328 == (1328 // 16) ** 2
    assert layout.text_tokens == 512 and layout.temporal_compression == 1


@pytest.mark.parametrize("name", ["qwen-image", "qwen-image-edit-2511"])
def test_tiny_components_run(name):
    torch.manual_seed(0)
    components = build_tiny_components(PRESETS[name])
    assert set(components) == {"dit", "vae", "text_encoder"}
    dit, vae, encoder = components["dit"].eval(), components["vae"].eval(), components["text_encoder"].eval()
    assert dit.config.zero_cond_t == (name == "qwen-image-edit-2511")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        prompt = encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        assert prompt.shape == (1, 5, dit.config.joint_attention_dim)
        latents = vae.encode(torch.zeros(1, 3, 1, 32, 32))
        tokens = torch.randn(1, 2 * 2 * 2, dit.config.in_channels)  # the target and one reference, 2x2 tokens each
        out = dit(tokens, torch.tensor([0.5]), prompt, None, [(1, 2, 2), (1, 2, 2)])
    assert latents.shape == (1, 16, 1, 4, 4) and out.shape == tokens.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(PRESETS))
def test_released_components_on_meta(name):
    with torch.device("meta"):
        components = build_components(PRESETS[name])
    assert set(components) == {"dit", "vae", "text_encoder"}
    assert all(p.is_meta for module in components.values() for p in module.parameters())
    assert isinstance(components["dit"], QwenImageDiT) and isinstance(components["vae"], WanVAE)
    assert count(components["dit"]) == 20_430_401_088
    assert components["dit"].config.zero_cond_t == (name == "qwen-image-edit-2511")


def test_released_sizes_match_the_reference_classes():
    """The released DiT, VAE and text encoder (less its LM head) have the parameters of diffusers' and transformers'
    classes at their default (released) configs."""
    with torch.device("meta"):
        ours = build_components(PRESETS["qwen-image"])
        dit = QwenImageTransformer2DModel()
        vae = AutoencoderKLQwenImage()
        encoder = Qwen2_5_VLForConditionalGeneration(qwen25vl_7b_config())
    assert count(ours["dit"]) == count(dit)
    assert count(ours["vae"]) == count(vae)
    assert count(ours["text_encoder"]) == count(encoder) - encoder.lm_head.weight.numel()
    theirs = {key: tuple(value.shape) for key, value in encoder.model.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in ours["text_encoder"].state_dict().items()} == theirs
