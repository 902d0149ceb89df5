"""The Z-Image text encoder: transformers' ``Qwen3Model`` (Qwen3-4B), configured, not rewritten.

The released ``text_encoder/`` is a ``Qwen3ForCausalLM`` checkpoint with tied embeddings (keys ``model.*``, no
``lm_head``); the DiT reads the second-to-last hidden states of the chat-templated prompt, valid tokens only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import Qwen3Config, Qwen3Model

__all__ = [
    "MAX_PROMPT_TOKENS",
    "PromptTooLongError",
    "build_text_encoder",
    "encode_prompt",
    "format_prompt",
    "qwen3_4b_config",
    "qwen3_config_from_shapes",
    "rope_theta",
]

MAX_PROMPT_TOKENS = 512  # the official pipeline's max_sequence_length


class PromptTooLongError(ValueError):
    """A templated prompt has more tokens than the model reads; the official pipelines would cut it silently."""


def qwen3_4b_config() -> Qwen3Config:
    """Qwen3-4B as released in ``Tongyi-MAI/Z-Image-Turbo/text_encoder/config.json``."""
    return Qwen3Config(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        attention_bias=False,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151645,
        use_cache=False,
    )


def build_text_encoder(config: Qwen3Config) -> Qwen3Model:
    """A ``Qwen3Model`` (the decoder without the LM head) in eval mode, as the pipelines use it."""
    return Qwen3Model(config).eval()


def qwen3_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], config_json: Mapping[str, Any] | None = None):
    """A ``Qwen3Config`` from the ``Qwen3Model`` key shapes (no ``model.`` prefix); values only a ``config.json``
    can say (RoPE theta, norm eps, positions) come from it when given, else from Qwen3-4B."""
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    layers = 1 + max(int(key.split(".")[1]) for key in shapes if key.startswith("layers."))
    fields: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": shapes["layers.0.mlp.gate_proj.weight"][0],
        "num_hidden_layers": layers,
        "num_attention_heads": shapes["layers.0.self_attn.q_proj.weight"][0] // head_dim,
        "num_key_value_heads": shapes["layers.0.self_attn.k_proj.weight"][0] // head_dim,
        "head_dim": head_dim,
        "attention_bias": "layers.0.self_attn.q_proj.bias" in shapes,
    }
    released = qwen3_4b_config()
    json = dict(config_json or {})
    for name in ("rms_norm_eps", "max_position_embeddings", "hidden_act", "tie_word_embeddings"):
        fields[name] = json.get(name, getattr(released, name))
    # transformers 5 keeps the RoPE base in rope_parameters; config.json files of 4.x say rope_theta.
    theta = (json.get("rope_parameters") or {}).get("rope_theta", json.get("rope_theta"))
    fields["rope_theta"] = float(theta if theta is not None else rope_theta(released))
    return Qwen3Config(**fields, use_cache=False)


def rope_theta(config: Qwen3Config) -> float:
    """The RoPE base of a Qwen3 config (``rope_parameters`` in transformers 5, ``rope_theta`` before)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def format_prompt(tokenizer: Any, prompt: str) -> str:
    """The chat-templated prompt: one user turn, the generation prompt, ``enable_thinking=True`` (which adds no
    think block), as the official and diffusers pipelines build it."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)


def encode_prompt(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str],
    max_length: int = MAX_PROMPT_TOKENS,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts for the DiT: ``(embeddings (B, L, hidden), mask (B, L) bool)``.

    Each prompt is chat-templated (``format_prompt``), tokenized and padded to ``max_length`` as the official
    pipeline does, run through the encoder with its attention mask, and the second-to-last hidden states are
    returned; ``mask`` marks the valid tokens, which are what the official pipeline passes on
    (``embeddings[i][mask[i]]``). Columns that are padding in every prompt are cut off, so ``L`` is the longest
    prompt's length.

    Raises ``PromptTooLongError`` (a ``ValueError``) naming the prompt's token count when a templated prompt is
    longer than ``max_length``: the official pipelines would cut it silently.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encode_prompt needs at least one prompt")
    texts = [format_prompt(tokenizer, prompt) for prompt in prompts]
    lengths = [len(tokenizer(text, add_special_tokens=True)["input_ids"]) for text in texts]
    for index, length in enumerate(lengths):
        if length > max_length:
            raise PromptTooLongError(
                f"prompt {index} is {length} tokens with the chat template; Z-Image reads at most {max_length}. "
                "Shorten it (the official pipeline would silently drop the rest)"
            )
    inputs = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    device = device if device is not None else next(text_encoder.parameters()).device
    input_ids = inputs["input_ids"].to(device)
    mask = inputs["attention_mask"].to(device).bool()
    hidden = text_encoder(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    used = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 0
    return hidden[:, :used], mask[:, :used]
