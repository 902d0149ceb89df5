"""FLUX.1's text encoders: transformers ``CLIPTextModel`` (pooled output) and ``T5EncoderModel``, configured.

The DiT reads two things from the prompt, exactly as BFL's ``HFEmbedder`` and diffusers' ``FluxPipeline``
compute them: the T5 ``last_hidden_state`` of the prompt padded (with ``<pad>``) and truncated to
``t5_sequence_length`` tokens, ``(B, S, 4096)``, and CLIP's ``pooler_output`` (the final-layer-norm output at
the end-of-text token) of the prompt padded and truncated to 77 tokens, ``(B, 768)``. Neither encoder gets an
attention mask: the padding tokens are attended to, as in the reference.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from ds_models_flux.converters import clip_inner_prefix
from ds_vram import get_vram_handle

__all__ = [
    "CLIP_MAX_LENGTH",
    "FluxTextEncoders",
    "PromptTruncatedWarning",
    "build_clip_text_model",
    "build_t5_encoder",
    "clip_config_from_shapes",
    "load_tokenizers",
    "t5_config_from_shapes",
]

CLIP_MAX_LENGTH = 77  # CLIP's position embeddings; FLUX always pads the CLIP prompt to this
CLIP_HEAD_DIM = 64  # CLIP text models use 64-wide heads (CLIP-L: 768 / 12); used when no config.json is at hand


class PromptTruncatedWarning(UserWarning):
    """A prompt had more tokens than an encoder reads; the message says how many were dropped."""


def _json_fields(config_json: dict[str, Any] | None, model_types: tuple[str, ...]) -> dict[str, Any]:
    """Fields of a transformers ``config.json`` next to the weights, when it describes this kind of model."""
    if not config_json or config_json.get("model_type") not in model_types:
        return {}
    return {k: v for k, v in config_json.items() if not k.startswith("_") and k not in ("architectures", "dtype")}


def clip_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], config_json: dict[str, Any] | None = None
) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` from the shapes of a ``CLIPTextModel`` checkpoint (keys with or without ``text_model.``).

    Sizes come from the shapes; what shapes cannot tell (heads, activation, token ids) from ``config_json`` when
    the checkpoint has one, else the CLIP-L values FLUX uses (64-wide heads, quick-GELU, legacy end-of-text
    lookup by ``argmax(input_ids)`` via ``eos_token_id=2``).
    """
    shapes = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
    fields: dict[str, Any] = {
        "hidden_act": "quick_gelu",
        "num_attention_heads": max(1, hidden // CLIP_HEAD_DIM),
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        **_json_fields(config_json, ("clip_text_model",)),
    }
    fields.update(
        vocab_size=vocab,
        hidden_size=hidden,
        max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
        num_hidden_layers=layers,
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
        projection_dim=fields.get("projection_dim", hidden),
    )
    return CLIPTextConfig(**fields)


def t5_config_from_shapes(shapes: dict[str, tuple[int, ...]], config_json: dict[str, Any] | None = None) -> T5Config:
    """A ``T5Config`` for ``T5EncoderModel`` from the shapes of its checkpoint (keys without any prefix).

    The relative attention bias ``(buckets, heads)`` gives the head count; ``wi_0``/``wi_1`` mean gated-GELU
    (T5 v1.1, FLUX's T5-XXL), a single ``wi`` ReLU (original T5).
    """
    embedding = shapes.get("shared.weight") or shapes["encoder.embed_tokens.weight"]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff_key = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    fields: dict[str, Any] = {"relative_attention_max_distance": 128, **_json_fields(config_json, ("t5", "umt5"))}
    fields.update(
        vocab_size=embedding[0],
        d_model=embedding[1],
        num_heads=heads,
        d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
        d_ff=shapes[ff_key][0],
        num_layers=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.block.")),
        relative_attention_num_buckets=buckets,
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5Config(**fields)


def build_clip_text_model(config: CLIPTextConfig) -> CLIPTextModel:
    """A ``CLIPTextModel`` for the loader (built under the meta device).

    Its ``position_ids`` buffer is not saved in checkpoints, so it is made here, on the CPU, where the loader
    and ds-vram find it.
    """
    model = CLIPTextModel(config)
    embeddings = model.get_submodule(clip_inner_prefix() + "embeddings")
    positions = torch.arange(config.max_position_embeddings, device="cpu")[None]
    embeddings.register_buffer("position_ids", positions, persistent=False)
    return model


def build_t5_encoder(config: T5Config) -> T5EncoderModel:
    """A ``T5EncoderModel`` for the loader (built under the meta device)."""
    return T5EncoderModel(config)


def load_tokenizers(folder: str | os.PathLike) -> tuple[CLIPTokenizer, T5TokenizerFast]:
    """The CLIP and T5 tokenizers of a FLUX.1 repository folder, from its ``tokenizer/`` and ``tokenizer_2/``."""
    root = Path(folder)
    for name in ("tokenizer", "tokenizer_2"):
        if not (root / name).is_dir():
            raise FileNotFoundError(f"{root / name} not found: a FLUX.1 repository has tokenizer/ and tokenizer_2/")
    return CLIPTokenizer.from_pretrained(root / "tokenizer"), T5TokenizerFast.from_pretrained(root / "tokenizer_2")


def _device_of(model: nn.Module) -> torch.device:
    """Where a model's inputs go: its first real (not meta) parameter's device, else the CPU (ds-vram moves)."""
    handle = get_vram_handle(model)
    if handle is not None:
        return torch.device(handle.config.computation_device)
    for parameter in model.parameters():
        if not parameter.is_meta:
            return parameter.device
    return torch.device("cpu")


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int, name: str) -> torch.Tensor:
    """Token ids padded and truncated to ``max_length``; warns, naming the count, when tokens are dropped."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_length=False,
        return_overflowing_tokens=False,
        return_tensors="pt",
    ).input_ids
    full = tokenizer(prompts, padding=False, truncation=False, verbose=False).input_ids
    for index, tokens in enumerate(full):
        if len(tokens) > max_length:
            dropped = len(tokens) - max_length
            kept = tokenizer.decode(ids[index], skip_special_tokens=True)
            warnings.warn(
                f"{name}: prompt {index} has {len(tokens)} tokens; the last {dropped} were dropped to fit "
                f"{max_length} (kept: {kept[-60:]!r})",
                PromptTruncatedWarning,
                stacklevel=3,
            )
    return ids


@dataclass
class FluxTextEncoders:
    """CLIP and T5 with their tokenizers; ``encode_prompt`` gives what the FLUX.1 DiT reads (``txt`` and ``y``)."""

    clip: CLIPTextModel
    t5: T5EncoderModel
    clip_tokenizer: Any  # CLIPTokenizer (or the fast one)
    t5_tokenizer: Any  # T5TokenizerFast (or the slow one)

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        t5_sequence_length: int = 512,
        device: torch.device | str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts for the DiT.

        t5_sequence_length: T5 tokens per prompt, padded or truncated (512 for dev-family models, 256 for
            schnell; at most 512, the length FLUX was trained with).
        device: where the token ids go; default the encoders' (computation) device.

        Returns ``(t5_hidden_states (B, S, d_model), clip_pooled (B, hidden))`` in the encoders' dtypes; text
        positions for the DiT are zeros ``(B, S, 3)``.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if not isinstance(t5_sequence_length, int) or not 1 <= t5_sequence_length <= 512:
            raise ValueError(f"t5_sequence_length={t5_sequence_length!r} must be an integer in 1..512 (dev: 512)")
        clip_length = min(CLIP_MAX_LENGTH, getattr(self.clip_tokenizer, "model_max_length", CLIP_MAX_LENGTH))
        clip_ids = _tokenize(self.clip_tokenizer, prompts, clip_length, "CLIP")
        t5_ids = _tokenize(self.t5_tokenizer, prompts, t5_sequence_length, "T5")
        clip_device = torch.device(device) if device is not None else _device_of(self.clip)
        t5_device = torch.device(device) if device is not None else _device_of(self.t5)
        pooled = self.clip(input_ids=clip_ids.to(clip_device), output_hidden_states=False).pooler_output
        hidden = self.t5(input_ids=t5_ids.to(t5_device), output_hidden_states=False).last_hidden_state
        return hidden, pooled
