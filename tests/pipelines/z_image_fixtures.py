"""A tiny Z-Image repository laid out as Tongyi-MAI/Z-Image-Turbo (which is a diffusers folder), built offline.

One session fixture, ``z_image_files``, writes ``repo``: ``transformer/`` (a tiny diffusers
``ZImageTransformer2DModel``), ``text_encoder/`` (a tiny transformers ``Qwen3Model`` as wide as the DiT's caption
features), ``tokenizer/`` (a byte-level BPE Qwen2 tokenizer with Qwen3's chat-template behaviour), ``vae/`` (a tiny
diffusers ``AutoencoderKL`` with the FLUX.1 VAE's 16 latent channels, scaling and shift) and ``model_index.json``.
The diffusers and transformers modules stay on the namespace, so tests run diffusers' ``ZImagePipeline`` on the very
same weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Qwen3Config, Qwen3Model

from ds_models_flux import FluxVAEConfig
from tests.models.flux import test_vae
from tests.models.flux.conftest import _randomize_text_encoder

CAPTION_DIM = 32  # the tiny Qwen3's hidden size, the DiT's cap_feat_dim
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's chat template as it renders one user message: a user turn, the assistant's opening, and with thinking
# switched off an empty think block (Z-Image renders with enable_thinking=True, so without it).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

DIT_KWARGS = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=2,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=CAPTION_DIM,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[1024, 512, 512],
)


def write_qwen_tokenizer(folder: Path, max_length: int = 131072) -> int:
    """A byte-level BPE tokenizer with Qwen's special tokens, saved as Qwen3's ``tokenizer/``; returns the vocab
    size. Every byte is a token and a few merges join frequent pairs, so any prompt tokenizes."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: index for index, char in enumerate(sorted(alphabet))}
    merges = [("t", "h"), ("th", "e"), ("a", "n"), ("an", "d"), ("Ġ", "t"), ("Ġ", "a"), ("Ġ", "c")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": max_length,
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "bos_token": None,
        "add_prefix_space": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer.get_vocab_size()


def randomize_dit(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights with enough scale that the caption, the timestep and every token move the output (diffusers zeroes
    some output layers at init, which would hide a wrong schedule or guidance)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim >= 2:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            elif "norm" in name:
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(0.2 * noise)
    return model.eval()


def tiny_transformer(seed: int, **overrides) -> ZImageTransformer2DModel:
    return randomize_dit(ZImageTransformer2DModel(**(DIT_KWARGS | overrides)), seed)


def tiny_text_encoder(vocab_size: int, seed: int) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=CAPTION_DIM,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = Qwen3Model(config)
    _randomize_text_encoder(model, seed)
    return model.eval()


def tiny_vae(seed: int) -> AutoencoderKL:
    """The FLUX.1 VAE at test width, as diffusers configures it (16 channels, scaling 0.3611, shift 0.1159)."""
    torch.manual_seed(seed)
    model = AutoencoderKL(**test_vae.diffusers_config(FluxVAEConfig.tiny()))
    test_vae.randomize(model, seed=seed)
    return model.eval()


def write_repo(root: Path, seed: int = 50) -> SimpleNamespace:
    """The tiny repository at ``root`` and its modules."""
    ns = SimpleNamespace(repo=root)
    vocab_size = write_qwen_tokenizer(root / "tokenizer")
    ns.transformer = tiny_transformer(seed)
    ns.transformer.save_pretrained(root / "transformer")
    ns.text_encoder = tiny_text_encoder(vocab_size, seed + 1)
    ns.text_encoder.save_pretrained(root / "text_encoder")
    ns.vae = tiny_vae(seed + 2)
    ns.vae.save_pretrained(root / "vae")
    index = {
        "_class_name": "ZImagePipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index))
    scheduler = root / "scheduler"
    scheduler.mkdir()
    # Z-Image-Turbo's scheduler_config.json: a static shift of 3.
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    (scheduler / "scheduler_config.json").write_text(json.dumps(config | {"use_dynamic_shifting": False}))
    return ns


def diffusers_pipeline(ns: SimpleNamespace):
    """diffusers' ZImagePipeline on the fixture's modules, with Z-Image-Turbo's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import ZImagePipeline as DiffusersZImagePipeline
    from transformers import AutoTokenizer

    return DiffusersZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(ns.repo / "scheduler"),
        vae=ns.vae,
        text_encoder=ns.text_encoder,
        tokenizer=AutoTokenizer.from_pretrained(ns.repo / "tokenizer"),
        transformer=ns.transformer,
    )


@pytest.fixture(scope="session")
def z_image_files(tmp_path_factory) -> SimpleNamespace:
    return write_repo(tmp_path_factory.mktemp("z_image_pipeline") / "Z-Image-tiny")
