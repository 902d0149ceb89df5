"""Tiny Qwen-Image repositories laid out as Qwen/Qwen-Image and Qwen/Qwen-Image-Edit-2509 (diffusers folders), built
offline.

One session fixture, ``qwen_image_files``, writes three repositories that share the text encoder, tokenizer and VAE:
``repo`` (Qwen-Image: ``transformer/`` a tiny diffusers ``QwenImageTransformer2DModel``, ``text_encoder/`` a tiny
transformers ``Qwen2_5_VLForConditionalGeneration`` as wide as the DiT's prompt features, ``tokenizer/`` a byte-level
BPE tokenizer with Qwen2.5-VL's special tokens, ``vae/`` a tiny diffusers ``AutoencoderKLQwenImage``, ``scheduler/``
and ``model_index.json``) and ``edit_repo`` (the same plus ``processor/``, Qwen2.5-VL's image processor config beside
the tokenizer files, and a ``QwenImageEditPlusPipeline`` index) and ``edit_2511_repo`` (the edit one with
``zero_cond_t`` in its transformer's ``config.json``). The diffusers and transformers modules stay on the
namespace, so tests run diffusers' pipelines on the very same weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import Qwen2_5_VLForConditionalGeneration

from ds_models_qwen_image.text_encoder import tiny_text_encoder_config

PROMPT_DIM = 32  # the tiny Qwen2.5-VL's hidden size, the DiT's joint_attention_dim
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

DIT_KWARGS = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=PROMPT_DIM,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)

# Qwen/Qwen-Image's scheduler/scheduler_config.json.
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Qwen/Qwen-Image-Edit's processor/preprocessor_config.json (Qwen2.5-VL's image processor).
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


def write_tokenizer(folder: Path) -> dict[str, int]:
    """A byte-level BPE tokenizer with Qwen2.5-VL's special tokens, saved as the release's ``tokenizer/``; returns
    the special tokens' ids. Every byte is a token and a few merges join frequent pairs, so any prompt tokenizes."""
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
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "unk_token": None,
        "bos_token": None,
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS} | {
        "vocab_size": tokenizer.get_vocab_size()
    }


def write_processor(folder: Path, tokenizer_folder: Path) -> None:
    """``processor/`` as Qwen-Image-Edit ships it: the image processor config beside the tokenizer files."""
    shutil.copytree(tokenizer_folder, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG))


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights with enough scale that the prompt, the timestep and every token move the output (diffusers zeroes
    some output layers at init, which would hide a wrong schedule or guidance). The query and key norms are scaled
    up so attention is sharp: with near-uniform attention over a few hundred prompt tokens, the edit images' and
    the prompt's own tokens would hardly move the image, and the parity tests could not tell them apart."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim >= 2:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            elif "attn.norm_" in name:
                parameter.copy_(3 * (1 + 0.1 * noise))
            elif "norm" in name:
                parameter.copy_(1 + 0.1 * noise)
            else:
                parameter.copy_(0.2 * noise)
    return model.eval()


def randomize_vae(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights whose activations neither vanish nor explode through the tiny VAE."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("gamma"):
                parameter.copy_(1 + 0.2 * noise)
            elif parameter.ndim >= 2:
                parameter.copy_(noise / math.prod(parameter.shape[1:]) ** 0.5)
            else:
                parameter.copy_(0.1 * noise)
    return module.eval()


def tiny_transformer(seed: int, **overrides) -> QwenImageTransformer2DModel:
    return randomize(QwenImageTransformer2DModel(**(DIT_KWARGS | overrides)), seed)


def tiny_text_encoder(ids: dict[str, int], seed: int) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL at test width (``tiny_text_encoder_config``) with this tokenizer's token ids, in the class the
    release saves (with its LM head), weights scaled so that every token, position and layer moves the output."""
    config = tiny_text_encoder_config(
        vocab_size=ids["vocab_size"],
        hidden_size=PROMPT_DIM,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and parameter.ndim == 1:
                parameter.copy_(1 + 0.2 * noise)
            elif parameter.ndim >= 2 and "embed_tokens" not in name:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            else:
                parameter.copy_(0.5 * noise)
    return model.eval()


def tiny_vae(seed: int) -> AutoencoderKLQwenImage:
    """The Qwen-Image (Wan 2.1) VAE at test width 16, with the released latent statistics."""
    return randomize_vae(
        AutoencoderKLQwenImage(
            base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
        ),
        seed,
    )


def _index(class_name: str, processor: bool) -> dict:
    index = {
        "_class_name": class_name,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    if processor:
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
    return index


def _write_scheduler(root: Path) -> None:
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))


def write_repos(root: Path, seed: int = 60) -> SimpleNamespace:
    """The tiny Qwen-Image and Qwen-Image-Edit-2509 repositories under ``root`` and their modules."""
    ns = SimpleNamespace(
        repo=root / "Qwen-Image-tiny",
        edit_repo=root / "Qwen-Image-Edit-2509-tiny",
        edit_2511_repo=root / "Qwen-Image-Edit-2511-tiny",
    )
    ns.ids = write_tokenizer(ns.repo / "tokenizer")
    ns.transformer = tiny_transformer(seed)
    ns.transformer.save_pretrained(ns.repo / "transformer")
    ns.text_encoder = tiny_text_encoder(ns.ids, seed + 1)
    ns.text_encoder.save_pretrained(ns.repo / "text_encoder")
    ns.vae = tiny_vae(seed + 2)
    ns.vae.save_pretrained(ns.repo / "vae")
    _write_scheduler(ns.repo)
    (ns.repo / "model_index.json").write_text(json.dumps(_index("QwenImagePipeline", processor=False)))

    edit = ns.edit_repo
    edit.mkdir(parents=True)
    for sub in ("tokenizer", "text_encoder", "vae", "scheduler"):
        (edit / sub).symlink_to(ns.repo / sub, target_is_directory=True)
    ns.edit_transformer = tiny_transformer(seed + 3)
    ns.edit_transformer.save_pretrained(edit / "transformer")
    write_processor(edit / "processor", ns.repo / "tokenizer")
    (edit / "model_index.json").write_text(json.dumps(_index("QwenImageEditPlusPipeline", processor=True)))

    # Edit-2511: the same layout; its transformer/config.json says zero_cond_t (reference tokens at t = 0).
    shutil.copytree(edit, ns.edit_2511_repo, symlinks=True)
    config_path = ns.edit_2511_repo / "transformer" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"zero_cond_t": True}))
    ns.edit_2511_transformer = QwenImageTransformer2DModel.from_pretrained(ns.edit_2511_repo / "transformer").eval()
    assert ns.edit_2511_transformer.zero_cond_t
    return ns


def scheduler(ns: SimpleNamespace):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(ns.repo / "scheduler")


def tokenizer(ns: SimpleNamespace):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ns.repo / "tokenizer")


def diffusers_pipeline(ns: SimpleNamespace, transformer=None):
    """diffusers' QwenImagePipeline on the fixture's modules, with Qwen-Image's scheduler."""
    from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline

    pipe = DiffusersQwenImagePipeline(
        scheduler=scheduler(ns),
        vae=ns.vae,
        text_encoder=ns.text_encoder,
        tokenizer=tokenizer(ns),
        transformer=transformer if transformer is not None else ns.transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_edit_plus_pipeline(ns: SimpleNamespace, transformer=None):
    """diffusers' QwenImageEditPlusPipeline on the edit repository's modules (or ``transformer``) and our
    processor."""
    from diffusers import QwenImageEditPlusPipeline

    from ds_models_qwen_image.text_encoder import load_processor

    pipe = QwenImageEditPlusPipeline(
        scheduler=scheduler(ns),
        vae=ns.vae,
        text_encoder=ns.text_encoder,
        tokenizer=tokenizer(ns),
        processor=load_processor(ns.edit_repo / "processor"),
        transformer=transformer if transformer is not None else ns.edit_transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def qwen_image_files(tmp_path_factory) -> SimpleNamespace:
    return write_repos(tmp_path_factory.mktemp("qwen_image_pipeline"))
