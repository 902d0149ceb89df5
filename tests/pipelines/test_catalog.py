"""The model catalog: released sizes from configs on meta, memory estimates per setting, VRAM suggestions."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ds_models_flux import FluxDiT, FluxDiTConfig
from ds_pipelines import (
    MEMORY_SETTINGS,
    download_model,
    estimate_memory,
    get_model_entry,
    inspect_lora,
    list_models,
    lora_key_format,
    suggest_vram,
)
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401  (a session fixture)

GIB = 1024**3


def test_flux_presets_are_sized_from_their_released_configs():
    names = [entry.name for entry in list_models()]
    assert {"flux.1-dev", "flux.1-schnell", "flux.1-fill-dev"} <= set(names)
    dev = get_model_entry("black-forest-labs/FLUX.1-dev")  # by model id too
    assert dev.name == "flux.1-dev" and dev.kind == "image" and dev.pipeline == "FluxImagePipeline"
    sizes = {c.name: c for c in dev.components}
    with torch.device("meta"):
        expected = sum(p.numel() for p in FluxDiT(FluxDiTConfig.dev()).parameters())
    assert sizes["dit"].parameters == expected and 11.8e9 < expected < 12.0e9
    assert 4.7e9 < sizes["text_encoder_2"].parameters < 4.8e9  # T5-XXL encoder
    assert sizes["dit"].bf16_bytes >= 2 * expected
    assert 0.5 < sizes["dit"].fp8_bytes / sizes["dit"].bf16_bytes < 0.53  # FP8 halves it; a few layers stay bf16
    with pytest.raises(ValueError, match=r"unknown model 'flux\.9'.*flux\.1-dev"):
        get_model_entry("flux.9")


def test_memory_estimates_order_and_suggestions():
    dev = get_model_entry("flux.1-dev")
    needs = [estimate_memory(dev, setting) for setting in MEMORY_SETTINGS]
    assert needs == sorted(needs, reverse=True)  # resident > offload > fp8 > stream
    assert 33 * GIB < needs[0] < 38 * GIB  # 31.4 GiB of bf16 weights plus activations
    assert estimate_memory(dev, "fp8", 512, 512) < estimate_memory(dev, "fp8", 2048, 2048)
    assert suggest_vram(dev, 80).setting == "resident"
    assert suggest_vram(dev, 16).vram_config_kwargs() == {"storage": "cpu", "storage_dtype": "fp8", "vram_limit": None}
    low = suggest_vram(dev, 8)
    assert low.setting == "stream" and low.fits and 0 < low.vram_limit < 8 and low.estimate_bytes <= 8 * GIB
    assert not suggest_vram(dev, 2).fits
    with pytest.raises(ValueError, match="gpu_memory=0"):
        suggest_vram(dev, 0)
    with pytest.raises(ValueError, match="setting='fast'"):
        estimate_memory(dev, "fast")


def test_download_model_resolves_through_ds_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")  # no network: the files are already there
    repo = tmp_path / "black-forest-labs" / "FLUX.1-schnell"
    for name in (
        "flux1-schnell.safetensors",
        "ae.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "tokenizer/vocab.json",
        "tokenizer_2/spiece.model",
    ):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(b"")
    paths = download_model("flux.1-schnell")
    assert paths["dit"] == [repo / "flux1-schnell.safetensors"]
    assert paths["tokenizer_2"] == [repo / "tokenizer_2"]


def test_inspect_lora_reports_format_rank_alpha_targets_metadata(tmp_path):
    state = {}
    for block in range(3):
        name = f"lora_unet_double_blocks_{block}_img_attn_qkv"
        state[f"{name}.lora_down.weight"] = torch.zeros(4, 32)
        state[f"{name}.lora_up.weight"] = torch.zeros(96, 4)
        state[f"{name}.alpha"] = torch.tensor(8.0)
    path = tmp_path / "style.safetensors"
    save_file(state, path, metadata={"ss_network_dim": "4", "ss_network_alpha": "8"})
    info = inspect_lora(path)
    assert (info.format, info.modules, info.ranks, info.alphas) == ("kohya", 3, {4: 3}, {8.0: 3})
    assert info.targets == {"lora_unet_double_blocks_*_img_attn_qkv": 3}
    assert info.metadata["ss_network_dim"] == "4" and info.parameters == 3 * (4 * 32 + 96 * 4)
    assert "ss_network_alpha" in str(info) and "kohya" in str(info)
    assert lora_key_format(["transformer.a.lora_A.weight", "transformer.a.lora_B.weight"]) == "diffusers"
    assert lora_key_format(["diffusion_model.a.lora_down.weight"]) == "comfyui"
    assert lora_key_format(["base_model.model.a.lora_A.default.weight"]) == "peft"
    assert lora_key_format(["a.lora_A.weight"]) == "diffsynth" and lora_key_format(["a.weight"]) == "unknown"
    save_file({"a.weight": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"plain\.safetensors: no LoRA down/up pairs"):
        inspect_lora(tmp_path / "plain.safetensors")


def test_pipeline_for_presets_ids_and_folders(flux_files, wan_files, tmp_path):  # noqa: F811
    from ds_pipelines import pipeline_for, preset_defaults

    assert pipeline_for("flux.1-dev") == ("FluxImagePipeline", "image")
    assert pipeline_for("black-forest-labs/FLUX.1-schnell") == ("FluxImagePipeline", "image")
    assert pipeline_for(flux_files.bfl_repo) == ("FluxImagePipeline", "image")  # BFL files, by detection
    assert pipeline_for(flux_files.repo) == ("FluxImagePipeline", "image")  # diffusers layout
    assert pipeline_for(wan_files.t2v) == ("WanVideoPipeline", "video")
    with pytest.raises(ValueError, match=r"nowhere.*not a preset, a released model id or an existing path"):
        pipeline_for(tmp_path / "nowhere")  # says what is wrong instead of handing it to one family's loader
    (tmp_path / "random.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"random\.txt: no installed family recognises the DiT in this file"):
        pipeline_for(tmp_path / "random.txt")
    assert preset_defaults("flux.1-schnell") == {"num_inference_steps": 4}
    assert preset_defaults("flux.1-dev") == {"num_inference_steps": 30, "embedded_guidance": 3.5}
    demo = preset_defaults(None)  # no model: the built-in demo
    assert demo["height"] == demo["width"] == 32 and "embedded_guidance" not in demo
    assert preset_defaults(flux_files.bfl_repo) == {}
