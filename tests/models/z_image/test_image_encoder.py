"""Omni-Base's SigLIP2 image encoder: the released size, detection of ``siglip/model.safetensors`` in both key
layouts, loading through ds-loader, and its place in the preset and the family's components."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ds_loader import detect, load_model
from ds_models_z_image import IMAGE_ENCODER_SPEC, SPECS, build_image_encoder, get_preset, siglip2_428m_config
from ds_models_z_image.family import FAMILY, build_components, build_tiny_components, tiny_image_encoder_config
from ds_models_z_image.image_encoder import encode_reference, image_processor

pytestmark = pytest.mark.usefixtures("one_thread")


def test_released_size_is_428m():
    with torch.device("meta"):
        model = build_image_encoder(siglip2_428m_config())
    count = sum(p.numel() for p in model.parameters())
    assert 427e6 < count < 429e6
    assert model.config.hidden_size == 1152 and model.config.num_hidden_layers == 27
    assert model.config.patch_size == 16 and model.config.num_patches == 256


@pytest.fixture(scope="module")
def tiny_encoder():
    torch.manual_seed(0)
    model = build_image_encoder(tiny_image_encoder_config())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("prefix", ["vision_model.", ""])
def test_detected_and_loaded(tmp_path, tiny_encoder, prefix):
    path = tmp_path / "siglip" / "model.safetensors"
    path.parent.mkdir()
    save_file({prefix + k: v.contiguous() for k, v in tiny_encoder.state_dict().items()}, str(path))
    (found,) = detect(str(path))
    assert found.spec.name == "z-image.image_encoder"
    assert found.format == ("transformers" if prefix else "bare")
    config = found.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (24, 2, 2)
    assert (config.patch_size, config.num_patches, config.vision_use_head) == (16, 16, True)
    loaded = load_model(str(path), spec=IMAGE_ENCODER_SPEC)
    processor = image_processor(max_num_patches=16)
    image = Image.new("RGB", (80, 48), (200, 40, 90))
    with torch.no_grad():
        a = encode_reference(tiny_encoder, processor, image)
        b = encode_reference(loaded, processor, image)
    assert a.shape[-1] == 24 and a.shape[0] * a.shape[1] <= 16
    torch.testing.assert_close(a, b)


def test_registered_in_specs_preset_and_family():
    assert IMAGE_ENCODER_SPEC in SPECS
    preset = get_preset("z-image-omni-base")
    assert preset.files["image_encoder"].pattern == "siglip/model.safetensors"
    assert preset.files["image_encoder"].model_id == "Tongyi-MAI/Z-Image-Omni-Base"
    assert "image_encoder" not in get_preset("z-image-turbo").files
    assert FAMILY.component_specs["z-image.image_encoder"] == "image_encoder"
    with torch.device("meta"):
        assert "image_encoder" in build_components(preset)
        assert "image_encoder" not in build_components(get_preset("z-image"))
    tiny = build_tiny_components(preset)
    assert tiny["image_encoder"].config.hidden_size == tiny["dit"].config.siglip_feat_dim
