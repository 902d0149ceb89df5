"""ds-vram manages models it never saw: a transformers T5 encoder and a diffusers FLUX transformer."""

from __future__ import annotations

import pytest
import torch

from ds_vram import SafetensorsSource, VRAMConfig, enable_vram_management

PLACES = [
    dict(storage="cpu"),
    dict(storage="cpu", vram_limit=0.0),
    dict(storage="disk", vram_limit=0.0),
    dict(storage="disk", vram_limit=0.0001),
]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    model = T5EncoderModel(config).eval()
    folder = tmp_path_factory.mktemp("t5")
    model.save_pretrained(folder)
    input_ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=input_ids).last_hidden_state
    return T5EncoderModel, config, folder, input_ids, expected


@pytest.mark.parametrize("place", PLACES, ids=str)
def test_transformers_t5_encoder(t5, place):
    model_class, _config, folder, input_ids, expected = t5
    model = model_class.from_pretrained(folder).eval()
    handle = enable_vram_management(
        model,
        VRAMConfig(computation_device="cpu", computation_dtype=torch.float32, **place),
        weights=SafetensorsSource(folder / "model.safetensors"),
    )
    with torch.no_grad():
        output = model(input_ids=input_ids).last_hidden_state
    assert torch.equal(output, expected)
    assert handle.report().layers  # the encoder's Linear, Embedding and T5LayerNorm layers are managed
    kinds = {layer.kind for layer in handle.report().layers}
    assert {"linear", "embedding", "generic"} <= kinds


def test_transformers_t5_encoder_fp8(t5):
    model_class, _config, folder, input_ids, expected = t5
    model = model_class.from_pretrained(folder).eval()
    enable_vram_management(
        model,
        VRAMConfig(storage="cpu", storage_dtype="fp8", computation_device="cpu", computation_dtype=torch.float32),
    )
    with torch.no_grad():
        output = model(input_ids=input_ids).last_hidden_state
    # e4m3 keeps 3 mantissa bits (up to 6% per weight); T5's random weights are large and attention sharpens it.
    assert 0 < relative_error(output, expected) < 0.1


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from diffusers import FluxTransformer2DModel

    arguments = dict(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**arguments).eval()
    folder = tmp_path_factory.mktemp("flux")
    model.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 8, generator=generator),
        encoder_hidden_states=torch.randn(1, 5, 24, generator=generator),
        pooled_projections=torch.randn(1, 20, generator=generator),
        timestep=torch.tensor([0.7]),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1
        ).reshape(16, 3),
        txt_ids=torch.zeros(5, 3),
    )
    with torch.no_grad():
        expected = model(**inputs).sample
    return FluxTransformer2DModel, folder, inputs, expected


@pytest.mark.parametrize("place", PLACES, ids=str)
def test_diffusers_flux_transformer(flux, place):
    model_class, folder, inputs, expected = flux
    model = model_class.from_pretrained(folder).eval()
    enable_vram_management(
        model,
        VRAMConfig(computation_device="cpu", computation_dtype=torch.float32, **place),
        weights=SafetensorsSource(folder / "diffusion_pytorch_model.safetensors"),
    )
    with torch.no_grad():
        for _ in range(2):
            # Not bitwise: BLAS sums in an order that depends on memory alignment, and weights read straight
            # from a mapped file sit at other offsets than loaded ones (diffusers' own reload differs by 4e-7).
            torch.testing.assert_close(model(**inputs).sample, expected, rtol=1e-6, atol=2e-6)


def test_diffusers_flux_transformer_fp8_from_meta(flux):
    model_class, folder, inputs, expected = flux
    with torch.device("meta"):
        model = model_class.from_config(model_class.load_config(folder)).eval()
    enable_vram_management(
        model,
        VRAMConfig(
            storage="disk",
            storage_dtype="fp8",
            computation_device="cpu",
            computation_dtype=torch.float32,
            vram_limit=1.0,
        ),
        weights=SafetensorsSource(folder / "diffusion_pytorch_model.safetensors"),
    )
    with torch.no_grad():
        output = model(**inputs).sample
    assert 0 < relative_error(output, expected) < 0.05
