"""Wan DiT detection, formats and presets: full-size layouts against diffusers on the meta device, the config
inferred from headers for every release, ComfyUI (plain and FP8) files, diffusers folders, and clear refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import load_file, save_file

from ds_loader import (
    Checkpoint,
    DetectionError,
    StateDictMismatchError,
    inspect_checkpoint,
    load_model,
    registry,
)
from ds_models_wan import DIT_SPEC, PRESETS, SPECS, WanDiT, WanDiTConfig, get_preset
from ds_models_wan.converters import dit_recipe
from ds_vram import TensorInfo
from tests.models.wan.test_dit import inputs

# The released diffusers configs (``Wan-AI/*-Diffusers`` ``transformer/config.json``), written out, not derived.
_D14B = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40}
DIFFUSERS_RELEASES = {
    "wan2.1-t2v-1.3b": {"num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960, "num_layers": 30},
    "wan2.1-t2v-14b": _D14B,
    "wan2.1-i2v-14b": {**_D14B, "in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},
    "wan2.1-flf2v-14b": {
        **_D14B,
        "in_channels": 36,
        "image_dim": 1280,
        "added_kv_proj_dim": 5120,
        "pos_embed_seq_len": 514,
    },
    "wan2.2-t2v-a14b": _D14B,
    "wan2.2-i2v-a14b": {**_D14B, "in_channels": 36},
    "wan2.2-ti2v-5b": {
        "num_attention_heads": 24,
        "attention_head_dim": 128,
        "ffn_dim": 14336,
        "num_layers": 30,
        "in_channels": 48,
        "out_channels": 48,
    },
}


class _MetaSource:
    """A weight source over a meta state dict: real shapes, no data."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def keys(self):
        return iter(self.state)

    def __contains__(self, key: object) -> bool:
        return key in self.state

    def info(self, key: str) -> TensorInfo:
        return TensorInfo(self.state[key].dtype, tuple(self.state[key].shape))

    def get(self, key: str) -> torch.Tensor:
        raise AssertionError("detection must not read tensors")


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.parametrize("name", list(DIFFUSERS_RELEASES))
def test_full_size_layout_matches_diffusers(name: str, tmp_path) -> None:
    """Our keys, fed to diffusers' single-file converter, give exactly WanTransformer3DModel's keys and shapes;
    diffusers' keys, through our recipe, give exactly ours; and detection infers the released config from them."""
    config = WanDiTConfig.preset(name)
    with torch.device("meta"):
        ours = WanDiT(config).state_dict()
        theirs = WanTransformer3DModel(**DIFFUSERS_RELEASES[name]).state_dict()
    converted = convert_wan_transformer_to_diffusers(dict(ours))
    if config.has_image_position_embedding:  # the converter leaves FLF2V's position embedding unmapped
        assert "img_emb.emb_pos" in converted
        converted["condition_embedder.image_embedder.pos_embed"] = converted.pop("img_emb.emb_pos")
    assert _shapes(converted) == _shapes(theirs)

    plan = dit_recipe("diffusers").plan(_MetaSource(theirs))
    assert {k: expr.info(_MetaSource(theirs)).shape for k, expr in plan.items()} == _shapes(ours)

    for state, fmt in ((ours, "official"), (theirs, "diffusers")):
        view = Checkpoint(_MetaSource(state), [tmp_path / "diffusion_pytorch_model.safetensors"]).view()
        detection = DIT_SPEC.detect(view)
        assert (detection.format, detection.config) == (fmt, config), fmt


def test_entry_point_registers_every_wan_spec() -> None:
    names = [spec.name for spec in SPECS]
    assert names == ["wan.dit", "wan.vae", "wan.vae22", "wan.text_encoder", "wan.image_encoder"]
    assert all(registry.get(name) is spec for name, spec in zip(names, SPECS, strict=True))


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v", "tiny-flf2v", "tiny-ti2v"])
def test_inspect_names_config_and_format(wan_dit_files, name: str) -> None:
    files = wan_dit_files[name]
    for path, fmt in ((files.official, "official"), (files.diffusers, "diffusers")):
        (entry,) = inspect_checkpoint(path).entries
        assert (entry.family, entry.model, entry.format, entry.config) == ("wan", "dit", fmt, files.config)


def test_config_json_gives_the_head_count(wan_dit_files, tmp_path) -> None:
    """Heads are not in the shapes; the official ``config.json`` (``num_heads``) says them."""
    files = wan_dit_files["tiny"]
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    path.write_bytes(files.official.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanModel", "num_heads": 4, "dim": 32}))
    (entry,) = inspect_checkpoint(path).entries
    assert entry.config == dataclasses.replace(files.config, num_heads=4)


def test_comfyui_files_plain_and_fp8(wan_dit_files, tmp_path) -> None:
    files = wan_dit_files["tiny-i2v"]
    state = load_file(files.official)
    reference = load_model(files.official)
    args = inputs(files.config)
    with torch.no_grad():
        expected = reference(**args)

    comfy = {"model.diffusion_model." + k: v for k, v in state.items()}
    comfy["vae.decoder.conv_in.weight"] = torch.zeros(2)  # all-in-one files hold other models too
    save_file(comfy, tmp_path / "comfy.safetensors")
    (entry,) = [e for e in inspect_checkpoint(tmp_path / "comfy.safetensors").entries if e.model == "dit"]
    assert (entry.format, entry.config) == ("comfyui", files.config)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "comfy.safetensors", spec="wan.dit")(**args), expected)

    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}
    save_file(fp8, tmp_path / "fp8.safetensors")
    model = load_model(tmp_path / "fp8.safetensors", torch_dtype=torch.float32)
    assert inspect_checkpoint(tmp_path / "fp8.safetensors").entries[0].format == "official-fp8"
    rounded = {k: v.to(torch.float32) for k, v in fp8.items()}
    assert torch.equal(model.state_dict()["blocks.0.self_attn.q.weight"], rounded["blocks.0.self_attn.q.weight"])


def test_scaled_fp8_is_refused_with_a_reason(wan_dit_files, tmp_path) -> None:
    state = load_file(wan_dit_files["tiny"].official)
    state["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    state["blocks.0.self_attn.q.scale_weight"] = torch.ones(1)
    save_file(state, tmp_path / "scaled.safetensors")
    with pytest.raises(DetectionError, match="scaled FP8"):
        load_model(tmp_path / "scaled.safetensors", spec="wan.dit")


def test_missing_and_mis_shaped_keys_are_listed(wan_dit_files, tmp_path) -> None:
    state = load_file(wan_dit_files["tiny"].official)
    del state["blocks.1.cross_attn.o.bias"]
    state["blocks.0.ffn.2.weight"] = torch.zeros(32, 65)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(StateDictMismatchError) as error:
        load_model(tmp_path / "bad.safetensors")
    message = str(error.value)
    assert "bad.safetensors" in message and "1 missing" in message and "blocks.1.cross_attn.o.bias" in message
    assert "blocks.0.ffn.2.weight (32, 65) vs (32, 64)" in message


def test_variants_are_refused_and_other_models_not_recognised(wan_dit_files, tmp_path) -> None:
    state = load_file(wan_dit_files["tiny"].official)
    save_file({**state, "vace_blocks.0.after_proj.weight": torch.zeros(2, 2)}, tmp_path / "vace.safetensors")
    with pytest.raises(DetectionError, match="VACE, S2V, Animate or Fun variant"):
        load_model(tmp_path / "vace.safetensors", spec="wan.dit")
    save_file({"double_blocks.0.img_in.weight": torch.zeros(2)}, tmp_path / "flux.safetensors")
    with pytest.raises(DetectionError, match="no patch_embedding"):
        load_model(tmp_path / "flux.safetensors", spec="wan.dit")


def test_diffusers_disk_offload_streams_the_converted_weights(wan_dit_files) -> None:
    """The diffusers recipe is lazy: with ds-vram disk storage the model stays on meta and gives the same output."""
    from ds_vram import VRAMConfig

    files = wan_dit_files["tiny-flf2v"]
    args = inputs(files.config)
    lazy = load_model(
        files.diffusers, vram=VRAMConfig(storage="disk", computation_device="cpu", computation_dtype=torch.float32)
    )
    with torch.no_grad():
        torch.testing.assert_close(lazy(**args), load_model(files.official)(**args))


def test_presets_cover_every_release() -> None:
    assert set(PRESETS) == {
        "wan2.1-t2v-1.3b",
        "wan2.1-t2v-14b",
        "wan2.1-i2v-14b-480p",
        "wan2.1-i2v-14b-720p",
        "wan2.1-flf2v-14b-720p",
        "wan2.2-t2v-a14b",
        "wan2.2-i2v-a14b",
        "wan2.2-ti2v-5b",
    }
    for preset in PRESETS.values():
        config = WanDiTConfig.preset(preset.dit_config)
        assert config.model_type == preset.model_type
        assert ("image_encoder" in preset.files) == config.has_image_input, preset.name
        assert preset.files["tokenizer"].model_id == "Wan-AI/Wan2.1-T2V-1.3B"
        for component, file in preset.files.items():
            model_config = preset.model_config(component, "huggingface")
            assert model_config.model_id == file.model_id and model_config.origin_file_pattern == file.pattern
    a14b = get_preset("WAN2.2-I2V-A14B")
    assert a14b.components == ("dit_high_noise", "dit_low_noise", "vae", "text_encoder", "tokenizer")
    assert a14b.boundary == 0.9 and get_preset("wan2.2-t2v-a14b").boundary == 0.875
    assert a14b.files["dit_high_noise"].pattern == "high_noise_model/diffusion_pytorch_model*.safetensors"
    ti2v = get_preset("wan2.2-ti2v-5b")
    assert (ti2v.fps, ti2v.vae_config, ti2v.files["vae"].pattern) == (24, "wan2.2", "Wan2.2_VAE.pth")
    assert get_preset("wan2.1-flf2v-14b-720p").sigma_shift == 16.0
    with pytest.raises(ValueError, match=r"unknown Wan preset 'wan2\.3'"):
        get_preset("wan2.3")
    with pytest.raises(ValueError, match="has no component 'image_encoder'"):
        get_preset("wan2.1-t2v-1.3b").model_config("image_encoder")
