"""Tiny FLUX.1 checkpoints in every layout we read, written once per session from diffusers/transformers models.

``flux_files`` holds: a diffusers-layout repository (``transformer/``, ``vae/`` via diffusers' own
``save_pretrained``, ``text_encoder/``, ``text_encoder_2/`` sharded with an index, ``tokenizer/``, ``tokenizer_2/``
in the official layout), the same weights as BFL files (``flux1-dev.safetensors``, ``ae.safetensors``), sharded
BFL files with an index, FP8 (e4m3fn) files, and a ComfyUI all-in-one file (``model.diffusion_model.``, ``vae.``,
``text_encoders.clip_l.transformer.``, ``text_encoders.t5xxl.transformer.``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ds_models_flux import FluxDiTConfig, FluxVAEConfig
from tests.models.flux import test_dit, test_vae

FP8 = torch.float8_e4m3fn
LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here computes on one thread (see tests/conftest.py)."""


def write_clip_tokenizer(folder: Path) -> int:
    """A byte-pair CLIP tokenizer over lower-case letters, laid out as FLUX's ``tokenizer/``; returns the vocab
    size. End-of-text is the largest id, as in CLIP's real vocabulary (the pooled output is read at argmax)."""
    vocab = [*LETTERS, *(c + "</w>" for c in LETTERS), "th", "the</w>", "an", "and</w>"]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\na n\nan d</w>\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": "<|endoftext|>", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "<|endoftext|>"}))
    return len(vocab)


def write_t5_tokenizer(folder: Path) -> int:
    """A unigram T5 tokenizer (``<pad>`` 0, ``</s>`` 1 appended to every prompt), as FLUX's ``tokenizer_2/``."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + c, -2.0) for c in LETTERS] + [(c, -3.0) for c in LETTERS] + [("▁the", -1.0), ("▁and", -1.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "extra_ids": 0, "model_max_length": 512}))
    return len(pieces)


def _randomize_text_encoder(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every token, position and layer changes the output clearly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and parameter.ndim == 1:
                parameter.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif parameter.ndim == 2 and "embed" not in name and "relative_attention_bias" not in name:
                parameter.copy_(noise / parameter.shape[1] ** 0.5)
            else:
                parameter.copy_(0.5 * noise)


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, stem: str, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    keys, weight_map = list(state), {}
    for index in range(count):
        name = f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[index::count]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index_path = folder / f"{stem}.safetensors.index.json"
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index_path


def _contiguous(state: dict[str, torch.Tensor], prefix: str = "", dtype: torch.dtype | None = None) -> dict:
    return {prefix + k: (v.to(dtype) if dtype is not None else v).contiguous() for k, v in state.items()}


@pytest.fixture(scope="session")
def flux_files(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("flux_files")
    ns = SimpleNamespace(root=root, dit_config=FluxDiTConfig.tiny(), vae_config=FluxVAEConfig.tiny())

    # The diffusers models, with weights of enough spread, saved by diffusers itself.
    ns.repo = root / "FLUX.1-tiny"
    ns.transformer = FluxTransformer2DModel(**test_dit.diffusers_kwargs(ns.dit_config)).eval()
    test_dit.randomize(ns.transformer, seed=11)
    ns.transformer.save_pretrained(ns.repo / "transformer")
    ns.autoencoder = AutoencoderKL(**test_vae.diffusers_config(ns.vae_config)).eval()
    test_vae.randomize(ns.autoencoder, seed=12)
    ns.autoencoder.save_pretrained(ns.repo / "vae")

    clip_vocab = write_clip_tokenizer(ns.repo / "tokenizer")
    t5_vocab = write_t5_tokenizer(ns.repo / "tokenizer_2")
    clip_config = CLIPTextConfig(
        vocab_size=clip_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,  # 64-wide heads, as CLIP-L
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=64,
        bos_token_id=0,
        eos_token_id=2,  # as FLUX's config.json: the legacy argmax lookup of the end-of-text token
        pad_token_id=1,
    )
    ns.clip = CLIPTextModel(clip_config).eval()
    _randomize_text_encoder(ns.clip, seed=13)
    ns.clip.save_pretrained(ns.repo / "text_encoder")
    t5_config = T5Config(
        vocab_size=t5_vocab,
        d_model=32,
        d_kv=8,
        num_heads=4,
        d_ff=48,
        num_layers=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    ns.t5 = T5EncoderModel(t5_config).eval()
    _randomize_text_encoder(ns.t5, seed=14)
    ns.t5.save_pretrained(ns.repo / "text_encoder_2", max_shard_size="20KB")
    (ns.repo / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))

    # The BFL layout: one file per model at the repository root, as black-forest-labs/FLUX.1-dev.
    ns.dit_state = _contiguous(test_dit.diffusers_to_bfl(ns.transformer.state_dict()))
    ns.vae_state = _contiguous(test_vae.diffusers_to_bfl(ns.autoencoder.state_dict(), len(ns.vae_config.ch_mult)))
    ns.dit_bfl = root / "flux1-dev.safetensors"
    save_file(ns.dit_state, ns.dit_bfl)
    ns.vae_bfl = root / "ae.safetensors"
    save_file(ns.vae_state, ns.vae_bfl)
    ns.dit_sharded = _save_sharded(ns.dit_state, root / "dit-sharded", "flux1-dev", 3)
    ns.dit_fp8 = root / "flux1-dev-fp8-e4m3fn.safetensors"
    save_file(_contiguous(ns.dit_state, dtype=FP8), ns.dit_fp8)
    ns.vae_fp8 = root / "ae-fp8.safetensors"
    save_file(_contiguous(ns.vae_state, dtype=FP8), ns.vae_fp8)

    # ComfyUI: the DiT alone, and an all-in-one file as Comfy-Org's flux1-dev-fp8 (DiT in FP8, the rest not).
    ns.dit_comfy = root / "flux1-dev-comfy.safetensors"
    save_file(_contiguous(ns.dit_state, "model.diffusion_model."), ns.dit_comfy)
    ns.all_in_one = root / "flux1-dev-fp8-all-in-one.safetensors"
    save_file(
        {
            **_contiguous(ns.dit_state, "model.diffusion_model.", FP8),
            **_contiguous(ns.vae_state, "vae."),
            **_contiguous(ns.clip.state_dict(), "text_encoders.clip_l.transformer."),
            **_contiguous(
                {k: v for k, v in ns.t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
                "text_encoders.t5xxl.transformer.",
            ),
        },
        ns.all_in_one,
    )
    ns.vae_sd = root / "sd-style-vae.safetensors"
    save_file(_contiguous(ns.vae_state, "first_stage_model."), ns.vae_sd)
    return ns
