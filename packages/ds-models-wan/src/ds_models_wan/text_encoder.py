"""Wan's text encoder: the umT5-XXL encoder as transformers ``UMT5EncoderModel``, configured, not rewritten.

The official ``models_t5_umt5-xxl-enc-bf16.pth`` holds the same network under other names (``T5Encoder`` of
Wan's ``wan/modules/t5.py``); ``wan_t5_recipe`` renames it lazily. Facts the mapping rests on, checked against
the official module and transformers' ``UMT5`` code:

- every block has its own relative position bias (``blocks.N.pos_embedding.embedding``, ``shared_pos=False``):
  transformers' UMT5 gives every layer ``relative_attention_bias``; 32 buckets, bidirectional, max distance 128,
  the same bucket formula;
- attention scores are not scaled by ``1/sqrt(d_kv)`` in either (T5 folds the scale into the weights);
- the feed-forward is ``fc2(fc1(x) * gelu_tanh(gate.0(x)))``: ``gate.0`` is transformers' ``wi_0`` (the
  activated branch, ``gelu_new`` = tanh GELU), ``fc1`` is ``wi_1`` (the linear branch), ``fc2`` is ``wo``;
- RMS norms without bias, eps 1e-6: ``norm1`` / ``norm2`` / ``norm`` are ``layer.0.layer_norm`` /
  ``layer.1.layer_norm`` / ``encoder.final_layer_norm``.

``encode_prompt`` gives what the Wan DiT reads as ``context``: the prompt cleaned as the official tokenizer
wrapper does, padded and truncated to ``max_length`` tokens, encoded with its attention mask, and every
position past the prompt's own tokens set to zero (the official pipeline trims to the true length, the DiT pads
back with zeros; diffusers' ``WanPipeline`` does both at once).
"""

from __future__ import annotations

import html
import importlib
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from ds_loader import Recipe, drop, rename, rule
from ds_loader.recipes import Expr, Key, KeyInfo
from ds_vram import get_vram_handle

__all__ = [
    "TEXT_MAX_LENGTH",
    "PromptTruncatedWarning",
    "build_umt5_encoder",
    "clean_prompt",
    "encode_prompt",
    "load_wan_tokenizer",
    "tiny_umt5_config",
    "umt5_config_from_shapes",
    "umt5_transformers_recipe",
    "umt5_xxl_config",
    "wan_t5_recipe",
]

TEXT_MAX_LENGTH = 512  # the official text_len: the DiT was trained on 512 context tokens
TOKENIZER_SUBFOLDER = "google/umt5-xxl"  # where the official Wan2.1 repositories keep the tokenizer


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than ``max_length``; the message says how many were dropped."""


def umt5_xxl_config() -> UMT5Config:
    """The released umT5-XXL encoder (official ``umt5_xxl``): 24 layers of width 4096, 64 heads of 64, gated
    tanh-GELU feed-forward of 10240, 256384 tokens, a 32-bucket relative position bias in every layer."""
    return UMT5Config(
        vocab_size=256384,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        is_encoder_decoder=False,
        use_cache=False,
    )


def tiny_umt5_config(vocab_size: int = 64) -> UMT5Config:
    """The same architecture at test size (2 layers, width 32, 4 heads of 8); ``vocab_size`` fits a tiny tokenizer."""
    config = umt5_xxl_config()
    config.update({"vocab_size": vocab_size, "d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4})
    config.num_decoder_layers = 2
    return config


def _json_fields(config_json: dict[str, Any] | None) -> dict[str, Any]:
    """Fields of a transformers ``config.json`` next to the weights, when it describes a (u)T5 model."""
    if not config_json or config_json.get("model_type") not in ("umt5", "t5"):
        return {}
    skip = ("architectures", "dtype", "torch_dtype", "model_type", "transformers_version")
    return {k: v for k, v in config_json.items() if not k.startswith("_") and k not in skip}


def umt5_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], config_json: dict[str, Any] | None = None
) -> UMT5Config:
    """A ``UMT5Config`` from the shapes of a checkpoint in transformers names (after ``wan_t5_recipe`` for the
    official layout). Every size is in the shapes: the relative bias ``(buckets, heads)`` gives the heads, ``q``
    the head width; the maximum relative distance (128) and eps come from ``config_json`` when present."""
    embedding = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block."))
    fields: dict[str, Any] = {"relative_attention_max_distance": 128, **_json_fields(config_json)}
    fields.update(
        vocab_size=embedding[0],
        d_model=embedding[1],
        num_heads=heads,
        d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=layers,
        num_decoder_layers=layers,
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return UMT5Config(**fields)


def build_umt5_encoder(config: UMT5Config) -> UMT5EncoderModel:
    """A ``UMT5EncoderModel`` for the loader (built under the meta device)."""
    return UMT5EncoderModel(config)


# --- recipes -----------------------------------------------------------------------------------------------------

_B = r"blocks\.(?P<i>\d+)\."
_OFFICIAL_RULES = (
    rename(_B + r"attn\.(?P<p>q|k|v|o)\.weight", r"encoder.block.\g<i>.layer.0.SelfAttention.\g<p>.weight"),
    rename(
        _B + r"pos_embedding\.embedding\.weight",
        r"encoder.block.\g<i>.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    rename(_B + r"norm1\.weight", r"encoder.block.\g<i>.layer.0.layer_norm.weight"),
    rename(_B + r"norm2\.weight", r"encoder.block.\g<i>.layer.1.layer_norm.weight"),
    rename(_B + r"ffn\.gate\.0\.weight", r"encoder.block.\g<i>.layer.1.DenseReluDense.wi_0.weight"),
    rename(_B + r"ffn\.fc1\.weight", r"encoder.block.\g<i>.layer.1.DenseReluDense.wi_1.weight"),
    rename(_B + r"ffn\.fc2\.weight", r"encoder.block.\g<i>.layer.1.DenseReluDense.wo.weight"),
    rename(r"norm\.weight", "encoder.final_layer_norm.weight"),
)


def _tied_embedding(match: re.Match[str], keys: KeyInfo) -> dict[str, Expr]:
    # UMT5EncoderModel ties shared.weight and encoder.embed_tokens.weight; a file holds one or both of them.
    if match.group(0) == "encoder.embed_tokens.weight" and "shared.weight" in keys:
        return {}
    source = Key(match.string)
    return {"shared.weight": source, "encoder.embed_tokens.weight": source}


def wan_t5_recipe() -> Recipe:
    """The official ``models_t5_umt5-xxl-enc-bf16.pth`` (``token_embedding``, ``blocks.N.*``, ``norm``) into
    ``UMT5EncoderModel`` names; a pure rename, so ds-vram disk storage streams it."""
    return Recipe(rule(r"token_embedding\.weight", _tied_embedding), *_OFFICIAL_RULES)


def umt5_transformers_recipe() -> Recipe:
    """A diffusers ``text_encoder/`` folder (transformers ``UMT5EncoderModel`` names; ComfyUI's ``umt5_xxl_*``
    files use them too): the tied embedding provided under both names; decoder and LM-head tensors of a full umT5
    file, and the ``spiece_model`` tokenizer blob some single files carry, dropped."""
    return Recipe(
        rule(r"shared\.weight|encoder\.embed_tokens\.weight", _tied_embedding),
        drop(r"decoder\..*|lm_head\..*|spiece_model"),
    )


# --- tokenizer and prompts ----------------------------------------------------------------------------------------


def load_wan_tokenizer(path: str | os.PathLike) -> Any:
    """The umT5 tokenizer (a ``T5TokenizerFast``) through ``AutoTokenizer``.

    path: the tokenizer folder itself (official ``google/umt5-xxl/``, diffusers ``tokenizer/``), or a repository
        root holding ``google/umt5-xxl/`` or ``tokenizer/`` (the official Wan2.1 layout and diffusers' one).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {root}")
    for candidate in (root, root / TOKENIZER_SUBFOLDER, root / "tokenizer"):
        if any((candidate / name).is_file() for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(candidate)
    raise FileNotFoundError(
        f"{root} holds no tokenizer (tokenizer.json, spiece.model or tokenizer_config.json) here, in "
        f"{TOKENIZER_SUBFOLDER}/ (official Wan layout) or in tokenizer/ (diffusers layout)"
    )


def clean_prompt(text: str) -> str:
    """The official prompt cleaning (``clean='whitespace'``): ftfy's text repair when ftfy is installed (as
    diffusers does; it is optional here), HTML entities unescaped twice, runs of whitespace made one space."""
    try:
        ftfy = importlib.import_module("ftfy")
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _device_of(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its ds-vram computation device, else its first real (not meta) parameter's."""
    handle = get_vram_handle(model)
    if handle is not None:
        return torch.device(handle.config.computation_device)
    for parameter in model.parameters():
        if not parameter.is_meta:
            return parameter.device
    return torch.device("cpu")


def _warn_truncated(tokenizer: Any, prompts: list[str], max_length: int) -> None:
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False).input_ids
    for index, tokens in enumerate(full):
        if len(tokens) > max_length:
            warnings.warn(
                f"prompt {index} has {len(tokens)} tokens; the last {len(tokens) - max_length} were dropped to fit "
                f"max_length={max_length}",
                PromptTruncatedWarning,
                stacklevel=3,
            )


def encode_prompt(
    text_encoder: UMT5EncoderModel,
    tokenizer: Any,
    prompts: str | Sequence[str],
    max_length: int = TEXT_MAX_LENGTH,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Prompt embeddings for the Wan DiT's ``context``: ``(B, max_length, d_model)`` in the encoder's dtype.

    Prompts are cleaned (``clean_prompt``), tokenized with the end-of-sequence token, padded and truncated to
    ``max_length`` (a warning names prompts that lose tokens), encoded with the attention mask, and the outputs
    past each prompt's true length are set to zero. device: where the token ids go (default: the encoder's
    computation device); the result stays there.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 1 <= max_length <= TEXT_MAX_LENGTH:
        raise ValueError(f"max_length={max_length!r} must be an integer in 1..{TEXT_MAX_LENGTH} (Wan uses 512)")
    prompts = [clean_prompt(p) for p in prompts]
    tokens = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    _warn_truncated(tokenizer, prompts, max_length)
    target = torch.device(device) if device is not None else _device_of(text_encoder)
    mask = tokens.attention_mask.to(target)
    hidden = text_encoder(input_ids=tokens.input_ids.to(target), attention_mask=mask).last_hidden_state
    # Positions past the prompt (padding) are zero, as in the official pipeline; the mask is contiguous ones.
    keep = torch.arange(max_length, device=hidden.device)[None, :] < mask.gt(0).sum(dim=1, keepdim=True)
    return torch.where(keep[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
