"""FLUX.1 presets: the released models' repositories and file patterns, and a local folder laid out like
black-forest-labs/FLUX.1-dev loading every component through them (no network: downloads are skipped)."""

from __future__ import annotations

import shutil

import pytest
import torch

from ds_loader import load_model
from ds_models_flux import PRESETS, FluxDiT, FluxDiTConfig, FluxTextEncoders, FluxVAE, get_preset, load_tokenizers
from ds_models_flux.presets import COMPONENTS


def test_released_models() -> None:
    assert list(PRESETS) == [
        "flux.1-dev",
        "flux.1-schnell",
        "flux.1-krea-dev",
        "flux.1-kontext-dev",
        "flux.1-fill-dev",
        "demo-digits",  # shipped local files (tests/pipelines/test_demo_digits.py)
    ]
    released = {name: p for name, p in PRESETS.items() if p.dit_config is not None}
    dit_files = {name: (p.files["dit"].model_id, p.files["dit"].pattern) for name, p in released.items()}
    assert dit_files == {
        "flux.1-dev": ("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors"),
        "flux.1-schnell": ("black-forest-labs/FLUX.1-schnell", "flux1-schnell.safetensors"),
        "flux.1-krea-dev": ("black-forest-labs/FLUX.1-Krea-dev", "flux1-krea-dev.safetensors"),
        "flux.1-kontext-dev": ("black-forest-labs/FLUX.1-Kontext-dev", "flux1-kontext-dev.safetensors"),
        "flux.1-fill-dev": ("black-forest-labs/FLUX.1-Fill-dev", "flux1-fill-dev.safetensors"),
    }
    dev = get_preset("FLUX.1-dev")
    assert {c: dev.files[c].pattern for c in COMPONENTS} == {
        "dit": "flux1-dev.safetensors",
        "vae": "ae.safetensors",
        "text_encoder": "text_encoder/model.safetensors",
        "text_encoder_2": "text_encoder_2/*.safetensors",
        "tokenizer": "tokenizer/",
        "tokenizer_2": "tokenizer_2/",
    }
    schnell = get_preset("flux.1-schnell")
    assert (schnell.t5_sequence_length, schnell.guidance, dev.t5_sequence_length) == (256, None, 512)
    assert {f.model_id for c, f in schnell.files.items()} == {"black-forest-labs/FLUX.1-schnell"}
    for preset in released.values():
        FluxDiTConfig.preset(preset.dit_config)  # names a real DiT config
        assert preset.model_id == preset.files["dit"].model_id
    assert FluxDiTConfig.preset(get_preset("flux.1-fill-dev").dit_config).in_channels == 384


def test_model_configs_per_source() -> None:
    dev = get_preset("flux.1-dev")
    for source in ("modelscope", "huggingface"):
        config = dev.model_config("text_encoder_2", download_source=source)
        assert (config.model_id, config.origin_file_pattern, config.source) == (
            "black-forest-labs/FLUX.1-dev",
            "text_encoder_2/*.safetensors",
            source,
        )
    assert set(dev.model_configs()) == set(COMPONENTS)
    with pytest.raises(ValueError, match=r"unknown FLUX\.1 preset 'flux.1-pro'; choose one of flux.1-dev"):
        get_preset("flux.1-pro")
    with pytest.raises(ValueError, match="has no component 'unet'"):
        dev.model_config("unet")


def test_a_local_copy_of_the_dev_repository_loads_through_the_preset(flux_files, tmp_path, monkeypatch) -> None:
    repo = tmp_path / "black-forest-labs" / "FLUX.1-dev"
    repo.mkdir(parents=True)
    shutil.copy(flux_files.dit_bfl, repo / "flux1-dev.safetensors")
    shutil.copy(flux_files.vae_bfl, repo / "ae.safetensors")
    for folder in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(flux_files.repo / folder, repo / folder)
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")

    dev = get_preset("flux.1-dev")
    dit = load_model(dev.model_config("dit"))
    vae = load_model(dev.model_config("vae"))
    clip = load_model(dev.model_config("text_encoder"))
    t5 = load_model(dev.model_config("text_encoder_2"))
    assert isinstance(dit, FluxDiT) and isinstance(vae, FluxVAE)
    assert dev.model_config("tokenizer").resolve() == [repo / "tokenizer"]
    encoders = FluxTextEncoders(clip, t5, *load_tokenizers(dev.model_config("dit").model_dir))
    with torch.no_grad():
        hidden, pooled = encoders.encode_prompt("the cat", t5_sequence_length=dev.t5_sequence_length)
    assert hidden.shape == (1, 512, flux_files.t5.config.d_model) and pooled.shape == (1, 64)
