"""A consistent tiny FLUX.1 repository (text encoder widths match the DiT) in diffusers and BFL layouts.

Built from the same writers tests/models/flux uses, so the tokenizers and weights are laid out as the official
repositories; the DiT's pooled-text width is CLIP's (64) here, as in a real release.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ds_models_flux import FluxDiTConfig, FluxVAEConfig
from tests.models.flux import test_dit, test_vae
from tests.models.flux.conftest import _randomize_text_encoder, write_clip_tokenizer, write_t5_tokenizer


@pytest.fixture(scope="session")
def flux_files(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("flux_pipeline")
    ns = SimpleNamespace(repo=root / "FLUX.1-tiny", bfl_repo=root / "FLUX.1-tiny-bfl")
    dit_config = dataclasses.replace(FluxDiTConfig.tiny(), vec_in_dim=64)
    vae_config = FluxVAEConfig.tiny()
    torch.manual_seed(0)
    ns.transformer = FluxTransformer2DModel(**test_dit.diffusers_kwargs(dit_config)).eval()
    test_dit.randomize(ns.transformer, seed=21)
    ns.transformer.save_pretrained(ns.repo / "transformer")
    ns.autoencoder = AutoencoderKL(**test_vae.diffusers_config(vae_config)).eval()
    test_vae.randomize(ns.autoencoder, seed=22)
    ns.autoencoder.save_pretrained(ns.repo / "vae")
    clip_vocab = write_clip_tokenizer(ns.repo / "tokenizer")
    t5_vocab = write_t5_tokenizer(ns.repo / "tokenizer_2")
    ns.clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=64,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        )
    ).eval()
    _randomize_text_encoder(ns.clip, seed=23)
    ns.clip.save_pretrained(ns.repo / "text_encoder")
    ns.t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=dit_config.context_in_dim,
            d_kv=8,
            num_heads=4,
            d_ff=48,
            num_layers=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
    ).eval()
    _randomize_text_encoder(ns.t5, seed=24)
    ns.t5.save_pretrained(ns.repo / "text_encoder_2")
    (ns.repo / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))

    # The same weights as black-forest-labs/FLUX.1-dev lays them out: BFL files at the root.
    ns.bfl_repo.mkdir()
    state = {k: v.contiguous() for k, v in test_dit.diffusers_to_bfl(ns.transformer.state_dict()).items()}
    save_file(state, ns.bfl_repo / "flux1-dev.safetensors")
    vae_state = test_vae.diffusers_to_bfl(ns.autoencoder.state_dict(), len(vae_config.ch_mult))
    save_file({k: v.contiguous() for k, v in vae_state.items()}, ns.bfl_repo / "ae.safetensors")
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(ns.repo / name, ns.bfl_repo / name)
    return ns
