"""Wan LoRA files in the three formats we write: they read back without a model, mean the same to diffusers'
``WanTransformer3DModel`` as to our ``WanDiT``, convert and merge without changing the weight deltas, and their
family is told from the layer names (so ``diffsynth lora convert|merge`` need no flag)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from safetensors import safe_open

from ds_models_wan import WanDiT, WanDiTConfig
from ds_models_wan.lora import wan_diffusers_lora_name, wan_layer_from_flat, wan_lora_target
from ds_pipelines.lora import lora_layers, parse_lora, read_lora
from ds_pipelines.lora_io import (
    FORMATS,
    convert_lora_file,
    guess_lora_family,
    lora_metadata,
    merge_lora_files,
    read_lora_layers,
    save_lora_file,
)
from tests.models.wan.conftest import official_state_dict, random_diffusers_dit
from tests.models.wan.test_dit import diffusers_call, inputs

CONFIG = WanDiTConfig.preset("tiny-i2v")  # image cross-attention (k_img, v_img) and img_emb, so every layer kind
RANK, ALPHA = 2, 3.0  # alpha != rank, so a lost alpha shows
BLOCK_LAYERS = [
    f"blocks.{i}.{name}"
    for i in range(CONFIG.num_layers)
    for name in (
        *(f"self_attn.{p}" for p in "qkvo"),
        *(f"cross_attn.{p}" for p in ("q", "k", "v", "o", "k_img", "v_img")),
        "ffn.0",
        "ffn.2",
    )
]
OTHER_LAYERS = [
    "head.head",
    "text_embedding.0",
    "text_embedding.2",
    "time_embedding.0",
    "time_embedding.2",
    "time_projection.1",
    "img_emb.proj.1",
    "img_emb.proj.3",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here computes on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def models() -> tuple[WanDiT, torch.nn.Module]:
    """Our tiny I2V DiT and diffusers' model with the very same weights."""
    theirs = random_diffusers_dit(CONFIG, seed=3)
    ours = WanDiT(CONFIG).eval()
    ours.load_state_dict(official_state_dict(theirs), strict=True)
    return ours, theirs


def random_lora(model: WanDiT, names: list[str], seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name in names:
        out_features, in_features = model.get_submodule(name).weight.shape
        down = torch.randn(RANK, in_features, generator=generator) * 0.3
        up = torch.randn(out_features, RANK, generator=generator) * 0.3
        layers[name] = (down, up, ALPHA)
    return layers


def deltas(layers) -> dict[str, torch.Tensor]:
    return {name: alpha / down.shape[0] * up.float() @ down.float() for name, (down, up, alpha) in layers.items()}


def assert_same_deltas(got, expected) -> None:
    got, expected = deltas(got), deltas(expected)
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def keys_of(path) -> set[str]:
    with safe_open(path, "pt") as file:
        return set(file.keys())


def test_official_and_diffusers_names_are_inverse() -> None:
    for layer in BLOCK_LAYERS + OTHER_LAYERS:
        name = wan_diffusers_lora_name(layer)
        assert name is not None and wan_lora_target(name).layer == layer, layer
        assert wan_layer_from_flat(layer.replace(".", "_")) == layer
    assert wan_diffusers_lora_name("blocks.0.norm3") is None and wan_layer_from_flat("blocks_0_cross_attn_x") is None


@pytest.mark.parametrize("format", FORMATS)
def test_round_trip_without_a_model(models, tmp_path, format) -> None:
    layers = random_lora(models[0], BLOCK_LAYERS + OTHER_LAYERS)
    path = save_lora_file(layers, tmp_path / f"{format}.safetensors", format=format, family="wan")
    assert guess_lora_family(path) == "wan"
    assert_same_deltas(read_lora_layers(path), layers)
    assert_same_deltas(read_lora_layers(path, model=models[0]), layers)


def test_kohya_flat_names_for_every_layer_kind(models, tmp_path) -> None:
    layers = random_lora(models[0], BLOCK_LAYERS + OTHER_LAYERS)
    path = save_lora_file(layers, tmp_path / "kohya.safetensors", format="kohya", family="wan")
    keys = keys_of(path)
    for flat in (
        "blocks_0_self_attn_q",
        "blocks_1_self_attn_o",
        "blocks_0_cross_attn_k",
        "blocks_1_cross_attn_k_img",
        "blocks_0_cross_attn_v_img",
        "blocks_0_ffn_0",
        "blocks_1_ffn_2",
        "head_head",
        "text_embedding_0",
        "time_embedding_2",
        "time_projection_1",
        "img_emb_proj_1",
    ):
        assert {f"lora_unet_{flat}.{part}" for part in ("lora_down.weight", "lora_up.weight", "alpha")} <= keys
    assert read_lora_layers(path).keys() == layers.keys()


def test_metadata_names_the_wan_family(models) -> None:
    metadata = lora_metadata(random_lora(models[0], BLOCK_LAYERS[:2]), family="wan")
    assert metadata["ss_network_module"] == "networks.lora_wan"
    assert metadata["ss_base_model_version"] == "wan2.1"
    assert metadata["modelspec.architecture"] == "wan2.1/lora"
    assert metadata["modelspec.implementation"] == "https://github.com/Wan-Video/Wan2.1"
    assert metadata["ss_network_dim"] == "2" and metadata["ss_network_alpha"] == "3"


def test_diffusers_converters_agree_on_our_names(models, tmp_path) -> None:
    """diffusers' own Wan converters (ComfyUI/official and musubi-tuner names) give our diffusers file's keys."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    layers = random_lora(models[0], BLOCK_LAYERS)  # musubi's converter wants the blocks only
    for format in FORMATS:
        save_lora_file(layers, tmp_path / f"{format}.safetensors", format=format, family="wan")
    with safe_open(tmp_path / "diffusers.safetensors", "pt") as file:
        ours = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    for format in ("comfyui", "kohya"):
        theirs = WanLoraLoaderMixin.lora_state_dict(str(tmp_path / f"{format}.safetensors"))
        assert set(theirs) == set(ours), format
        for key in (k for k in ours if k.endswith("lora_B.weight")):
            a_key = key.replace("lora_B", "lora_A")
            torch.testing.assert_close(theirs[key] @ theirs[a_key], ours[key] @ ours[a_key], rtol=1e-5, atol=1e-6)


def test_diffusers_file_changes_diffusers_model_as_ours(models, tmp_path) -> None:
    ours, theirs = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    layers = random_lora(ours, BLOCK_LAYERS + OTHER_LAYERS, seed=1)
    path = save_lora_file(layers, tmp_path / "lora.safetensors", format="diffusers", family="wan")
    args = inputs(CONFIG)
    with torch.no_grad():
        before = ours(**args)
        pieces, unknown = parse_lora(read_lora(path))
        matched, unmatched = lora_layers(pieces, ours, wan_lora_target)
        assert not unknown and not unmatched and matched.keys() == layers.keys()
        for name, (down, up) in matched.items():
            ours.get_submodule(name).weight += up @ down
        for name, delta in deltas(layers).items():  # the file's delta is exactly the LoRA's
            torch.testing.assert_close(matched[name][1] @ matched[name][0], delta, rtol=1e-5, atol=1e-6)
        after = ours(**args)
    assert (after - before).abs().max() > 1e-2

    with safe_open(path, "pt") as file:
        state = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="wan")
    reference = diffusers_call(theirs, CONFIG, args)
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-4)


def test_convert_chain_keeps_deltas(models, tmp_path) -> None:
    layers = random_lora(models[0], BLOCK_LAYERS + OTHER_LAYERS, seed=2)
    path = save_lora_file(layers, tmp_path / "a-comfyui.safetensors", format="comfyui", family="wan")
    for step, format in enumerate(("kohya", "diffusers", "comfyui")):
        path = convert_lora_file(path, tmp_path / f"{step}-{format}.safetensors", to=format)
        with safe_open(path, "pt") as file:
            metadata = file.metadata()
        assert metadata["ds.format"] == format and metadata["ss_network_module"] == "networks.lora_wan"
        assert_same_deltas(read_lora_layers(path), layers)
    assert any(key.startswith("diffusion_model.blocks.1.cross_attn.k_img.") for key in keys_of(path))


def test_merge_of_two_wan_loras(models, tmp_path) -> None:
    first = random_lora(models[0], BLOCK_LAYERS[:6], seed=3)
    second = random_lora(models[0], [*BLOCK_LAYERS[3:9], "head.head"], seed=4)
    a = save_lora_file(first, tmp_path / "a.safetensors", format="kohya", family="wan")
    b = save_lora_file(second, tmp_path / "b.safetensors", format="diffusers", family="wan")
    merged = read_lora_layers(merge_lora_files([(a, 0.7), (b, -0.5)], tmp_path / "ab.safetensors"))
    d1, d2, got = deltas(first), deltas(second), deltas(merged)
    assert sorted(got) == sorted(d1.keys() | d2.keys())
    for name, delta in got.items():
        expected = 0.7 * d1.get(name, 0) + -0.5 * d2.get(name, 0)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)


def test_family_guess(models, tmp_path) -> None:
    wan = save_lora_file(random_lora(models[0], BLOCK_LAYERS[:3]), tmp_path / "w.safetensors", family="wan")
    assert guess_lora_family(wan) == "wan"
    assert guess_lora_family(["transformer.blocks.0.attn1.to_q.lora_A.weight"]) == "wan"
    assert guess_lora_family(["lora_unet_blocks_3_ffn_0.alpha"]) == "wan"
    for flux in (
        "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight",
        "lora_unet_single_blocks_1_linear1.lora_up.weight",
        "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight",
        "transformer.single_transformer_blocks.2.proj_out.lora_B.weight",
    ):
        assert guess_lora_family([flux]) == "flux.1", flux
    # FLUX.1's double-block attention is spelled like Qwen-Image's: which family recognises more layers decides.
    attention = [f"transformer.transformer_blocks.{i}.attn.to_q.lora_A.weight" for i in range(60)]
    assert guess_lora_family(attention) == "qwen-image"  # FLUX.1 has 19 double blocks
    single = "transformer.single_transformer_blocks.0.proj_out.lora_A.weight"
    assert guess_lora_family([*attention[:19], single]) == "flux.1"
    with pytest.raises(ValueError, match="several families alike: "):
        guess_lora_family(attention[:2])
    generator = torch.Generator().manual_seed(0)
    flux_layers = {"double_blocks.0.img_attn.qkv": (torch.randn(2, 8, generator=generator), torch.randn(24, 2), 2.0)}
    flux_file = save_lora_file(flux_layers, tmp_path / "f.safetensors", format="kohya")
    assert guess_lora_family(flux_file) == "flux.1"
    with pytest.raises(ValueError, match="pass family="):
        guess_lora_family(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"])
    with pytest.raises(ValueError, match="different model families"):
        merge_lora_files([(wan, 1.0), (flux_file, 1.0)], tmp_path / "mixed.safetensors")


def test_wan_needs_no_flux_family(models, tmp_path, monkeypatch) -> None:
    """An installation with the Wan family only: ds_models_flux cannot be imported, Wan LoRAs still work."""
    monkeypatch.setitem(sys.modules, "ds_models_flux", None)
    monkeypatch.setitem(sys.modules, "ds_models_flux.lora", None)
    layers = random_lora(models[0], [*BLOCK_LAYERS[:4], "head.head"])
    path = save_lora_file(layers, tmp_path / "wan.safetensors", format="diffusers", family="wan")
    converted = convert_lora_file(path, tmp_path / "wan-kohya.safetensors", to="kohya")
    assert_same_deltas(read_lora_layers(converted), layers)


def test_cli_converts_and_inspects_a_wan_lora(models, tmp_path, capsys) -> None:
    from ds_cli.main import main

    layers = random_lora(models[0], [*BLOCK_LAYERS, "img_emb.proj.1"])
    source = save_lora_file(layers, tmp_path / "style.safetensors", format="kohya", family="wan")
    assert main(["lora", "convert", str(source), "--to", "diffusers"]) == 0
    converted = tmp_path / "style-diffusers.safetensors"
    assert capsys.readouterr().out.strip() == str(converted)
    assert "transformer.blocks.1.attn2.add_k_proj.lora_A.weight" in keys_of(converted)
    assert_same_deltas(read_lora_layers(converted), layers)
    merged = tmp_path / "merged.safetensors"
    assert main(["lora", "merge", str(source), str(converted), "--family", "wan", "-o", str(merged)]) == 0
    assert_same_deltas(read_lora_layers(merged), {k: (d, 2 * u, a) for k, (d, u, a) in layers.items()})
    capsys.readouterr()
    assert main(["lora", "inspect", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "format      diffusers" in out and "family      wan" in out and "networks.lora_wan" in out
