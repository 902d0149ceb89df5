"""Shared fixtures for the Wan tests: one compute thread, and tiny Wan DiT checkpoints in the layouts we read.

``wan_dit_files`` makes, once per session, for each tiny DiT config (``tiny``, ``tiny-i2v``, ``tiny-flf2v``,
``tiny-ti2v``): a diffusers ``WanTransformer3DModel`` with random weights saved by diffusers' own
``save_pretrained`` as a ``transformer/`` folder, and the same weights in the official Wan-AI names as
``diffusion_pytorch_model.safetensors`` (converted from the diffusers names by diffusers' single-file converter run
backwards: see ``official_state_dict``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from ds_models_wan import WanDiT, WanDiTConfig

TINY_DITS = ("tiny", "tiny-i2v", "tiny-flf2v", "tiny-ti2v")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here computes on one thread (see tests/conftest.py)."""


def diffusers_kwargs(config: WanDiTConfig) -> dict:
    """``WanTransformer3DModel`` arguments for the same architecture as ``config``."""
    image = config.has_image_input
    return {
        "patch_size": config.patch_size,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_dim,
        "out_channels": config.out_dim,
        "text_dim": config.text_dim,
        "freq_dim": config.freq_dim,
        "ffn_dim": config.ffn_dim,
        "num_layers": config.num_layers,
        "cross_attn_norm": config.cross_attn_norm,
        "eps": config.eps,
        "image_dim": config.clip_dim if image else None,
        "added_kv_proj_dim": config.dim if image else None,
        "pos_embed_seq_len": 2 * config.clip_tokens if config.has_image_position_embedding else None,
    }


def random_diffusers_dit(config: WanDiTConfig, seed: int = 0) -> WanTransformer3DModel:
    """A diffusers model of ``config``'s architecture with weights large enough that every path shows in the output
    (norm scales near 1, everything else N(0, 0.2)), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model = WanTransformer3DModel(**diffusers_kwargs(config)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            is_scale = "norm" in name and name.endswith("weight")
            parameter.copy_(1 + 0.1 * noise if is_scale else 0.2 * noise)
    return model


def official_state_dict(diffusers_model: WanTransformer3DModel) -> dict[str, torch.Tensor]:
    """The diffusers weights under the official names: invert diffusers' own single-file converter key by key
    (its map is not invertible by string replacement, so run it on our keys and read the correspondence)."""
    with torch.device("meta"):
        ours = WanDiT(_config_of(diffusers_model))
    names = {key: torch.empty(0) for key in ours.state_dict()}
    forward = {}
    for key in names:
        (converted,) = convert_wan_transformer_to_diffusers({key: names[key]}).keys()
        forward[converted] = key
    forward["condition_embedder.image_embedder.pos_embed"] = "img_emb.emb_pos"  # not in diffusers' converter
    return {forward[k]: v.detach().clone().contiguous() for k, v in diffusers_model.state_dict().items()}


def _config_of(model: WanTransformer3DModel) -> WanDiTConfig:
    for name in TINY_DITS:
        config = WanDiTConfig.preset(name)
        if diffusers_kwargs(config) == {k: _plain(model.config[k]) for k in diffusers_kwargs(config)}:
            return config
    raise AssertionError("not a tiny Wan DiT config")


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


@pytest.fixture(scope="session")
def wan_dit_files(tmp_path_factory) -> dict[str, SimpleNamespace]:
    """name -> (config, reference diffusers model, diffusers folder, official file) for every tiny DiT config."""
    root = tmp_path_factory.mktemp("wan_dit")
    files = {}
    for seed, name in enumerate(TINY_DITS):
        config = WanDiTConfig.preset(name)
        model = random_diffusers_dit(config, seed)
        folder = root / name / "transformer"
        model.save_pretrained(folder)
        official = root / name / "official" / "diffusion_pytorch_model.safetensors"
        official.parent.mkdir(parents=True)
        save_file(official_state_dict(model), official)
        files[name] = SimpleNamespace(config=config, reference=model, diffusers=folder, official=Path(official))
    return files
