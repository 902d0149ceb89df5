"""Tiny Wan repositories in diffusers layout, built from diffusers' own classes with random weights.

One session fixture, ``wan_files``, writes: ``t2v`` (one DiT, the 2.1 VAE), ``i2v`` (36-channel DiT with CLIP image
tokens, plus ``image_encoder/``), ``flf2v`` (I2V with the image position embedding for two images), ``a14b`` (two T2V
experts: ``transformer/`` high noise, ``transformer_2/`` low noise) and ``ti2v`` (48-channel DiT, the 2.2 VAE). The
diffusers modules stay on the namespace so tests can run diffusers' pipelines on the very same weights. Text and
CLIP widths match the tiny DiTs (text_dim 32, image_dim 32); CLIP sees 32 px images in 16 px patches (5 tokens), so
a 32x32 video frame reaches both CLIP paths unresized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

from ds_models_wan.vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
from tests.models.flux.conftest import _randomize_text_encoder, write_t5_tokenizer

TEXT_DIM = 32
CLIP_DIM = 32
CLIP_TOKENS = 5  # class token + (32 / 16) ** 2 patches


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights with enough scale that every path (text, time, image tokens, condition) moves the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim >= 2 and "scale_shift_table" not in name and "pos_embed" not in name:
                parameter.copy_(noise / (parameter[0].numel() ** 0.5))
            elif name.endswith("weight") or "gamma" in name:
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(0.2 * noise)
    return model.eval()


def tiny_transformer(seed: int, in_channels: int = 16, out_channels: int = 16, **kwargs) -> WanTransformer3DModel:
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=TEXT_DIM,
        freq_dim=256,
        ffn_dim=48,
        num_layers=2,
        **kwargs,
    )
    return randomize(model, seed)


def tiny_vae(seed: int, wan22: bool = False) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    if wan22:  # the Wan 2.2 VAE as diffusers configures Wan2.2-TI2V-5B, at test widths
        model = AutoencoderKLWan(
            base_dim=16,
            decoder_base_dim=16,
            z_dim=48,
            num_res_blocks=1,
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
            latents_mean=list(WAN22_LATENTS_MEAN),
            latents_std=list(WAN22_LATENTS_STD),
        )
    else:
        model = AutoencoderKLWan(base_dim=16, z_dim=16, num_res_blocks=1)
    return model.eval()


def tiny_clip(seed: int) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=CLIP_DIM,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=16,
    )
    model = CLIPVisionModel(config)
    _randomize_text_encoder(model, seed)
    return model.eval()


def _write_repo(root: Path, parts: dict[str, object], text: Path) -> Path:
    root.mkdir(parents=True)
    for name, module in parts.items():
        module.save_pretrained(root / name)
    for name in ("text_encoder", "tokenizer"):
        shutil.copytree(text / name, root / name)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return root


@pytest.fixture(scope="session")
def wan_files(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("wan_pipeline")
    ns = SimpleNamespace()
    text = root / "text"
    vocab = write_t5_tokenizer(text / "tokenizer")
    ns.text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=vocab,
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
    )
    _randomize_text_encoder(ns.text_encoder, seed=31)
    ns.text_encoder.eval().save_pretrained(text / "text_encoder")
    ns.tokenizer_path = text / "tokenizer"

    ns.vae = tiny_vae(32)
    ns.vae22 = tiny_vae(33, wan22=True)
    ns.image_encoder = tiny_clip(34)
    ns.t2v_transformer = tiny_transformer(35)
    i2v_kwargs = dict(in_channels=36, image_dim=CLIP_DIM, added_kv_proj_dim=24)
    ns.i2v_transformer = tiny_transformer(36, **i2v_kwargs)
    ns.flf2v_transformer = tiny_transformer(37, **i2v_kwargs, pos_embed_seq_len=2 * CLIP_TOKENS)
    ns.high_noise, ns.low_noise = tiny_transformer(38), tiny_transformer(39)
    ns.ti2v_transformer = tiny_transformer(40, in_channels=48, out_channels=48)

    ns.t2v = _write_repo(root / "t2v", {"transformer": ns.t2v_transformer, "vae": ns.vae}, text)
    i2v_parts = {"transformer": ns.i2v_transformer, "vae": ns.vae, "image_encoder": ns.image_encoder}
    ns.i2v = _write_repo(root / "i2v", i2v_parts, text)
    ns.flf2v = _write_repo(root / "flf2v", {**i2v_parts, "transformer": ns.flf2v_transformer}, text)
    a14b_parts = {"transformer": ns.high_noise, "transformer_2": ns.low_noise, "vae": ns.vae}
    ns.a14b = _write_repo(root / "a14b", a14b_parts, text)
    ns.ti2v = _write_repo(root / "ti2v", {"transformer": ns.ti2v_transformer, "vae": ns.vae22}, text)
    return ns
