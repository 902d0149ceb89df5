"""The Z-Image prompt path against diffusers' ZImagePipeline.encode_prompt, on a tiny Qwen3 and tokenizer built
offline: the chat template (enable_thinking=True, generation prompt), hidden_states[-2], valid tokens only; the
512-token guard; the Qwen3 text encoder spec (Qwen3ForCausalLM and Qwen3Model layouts, config from shapes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ZImagePipeline as DiffusersZImagePipeline
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM, Qwen3Model

from ds_loader import detect, load_model
from ds_models_z_image import PromptTooLongError, encode_prompt, format_prompt, qwen3_4b_config
from ds_models_z_image.family import tiny_text_encoder_config
from ds_models_z_image.text_encoder import rope_theta

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template for one user turn: enable_thinking=False would add an empty think block; True adds none.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
PROMPTS = ["a red fox in the snow", "the cat and the hat, and a much longer caption than the first one"]


def _write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer (Qwen2 style) with Qwen's special tokens and a chat template; its vocab size."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("Ġ", "a"), ("a", "n")]
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
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer.get_vocab_size()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("z_image_text")
    vocab = _write_tokenizer(root / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    torch.manual_seed(0)
    config = tiny_text_encoder_config()
    config.vocab_size = vocab
    encoder = Qwen3Model(config).eval()
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    return tokenizer, encoder


def test_chat_template_adds_no_think_block(parts):
    tokenizer, _ = parts
    text = format_prompt(tokenizer, "a fox")
    assert text == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"


def test_encode_prompt_matches_diffusers(parts):
    tokenizer, encoder = parts
    pipe = DiffusersZImagePipeline(
        scheduler=None, vae=None, text_encoder=encoder, tokenizer=tokenizer, transformer=None
    )
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False)
        embeddings, mask = encode_prompt(encoder, tokenizer, PROMPTS)
    assert embeddings.shape == (2, mask.shape[1], encoder.config.hidden_size) and mask.dtype == torch.bool
    assert mask.shape[1] == max(len(e) for e in expected)  # cut to the longest prompt
    for i, reference in enumerate(expected):
        torch.testing.assert_close(embeddings[i][mask[i]], reference, rtol=1e-5, atol=1e-5)
    assert mask[0].sum() < mask[1].sum()


def test_second_to_last_layer(parts):
    tokenizer, encoder = parts
    with torch.no_grad():
        embeddings, mask = encode_prompt(encoder, tokenizer, PROMPTS[0])
        ids = tokenizer(format_prompt(tokenizer, PROMPTS[0]), return_tensors="pt")["input_ids"]
        hidden = encoder(input_ids=ids, output_hidden_states=True).hidden_states
    assert mask.all()
    torch.testing.assert_close(embeddings, hidden[-2])
    assert not torch.allclose(embeddings, hidden[-1])


def test_a_long_prompt_is_an_error_naming_its_length(parts):
    tokenizer, encoder = parts
    prompt = "word " * 600
    length = len(tokenizer(format_prompt(tokenizer, prompt))["input_ids"])
    with pytest.raises(PromptTooLongError, match=f"prompt 1 is {length} tokens") as error:
        encode_prompt(encoder, tokenizer, ["short", prompt])
    assert isinstance(error.value, ValueError) and "512" in str(error.value)
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompt(encoder, tokenizer, [])


def test_released_config():
    config = qwen3_4b_config()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2560, 36, 32)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (8, 128, 9728)
    assert (config.vocab_size, rope_theta(config), config.max_position_embeddings) == (151936, 1e6, 40960)
    assert config.tie_word_embeddings
    with torch.device("meta"):
        count = sum(p.numel() for p in Qwen3Model(config).parameters())
    assert abs(count - 4.02e9) < 0.01e9  # Qwen3-4B without its (tied) LM head


# ---------------------------------------------------------------------------------------------- the spec
def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(path))
    return path


@pytest.mark.parametrize("layout", ["causal-lm", "causal-lm-untied", "qwen3-model"])
def test_text_encoder_spec_loads_each_layout(parts, tmp_path, layout):
    _, encoder = parts
    config = Qwen3Config(**encoder.config.to_dict())
    if layout.startswith("causal-lm"):
        config.tie_word_embeddings = layout == "causal-lm"
        full = Qwen3ForCausalLM(config)
        full.model.load_state_dict(encoder.state_dict())
        state = full.state_dict()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight")  # tied: not written to the released files
        expected_format = "transformers"
    else:
        state = encoder.state_dict()
        expected_format = "qwen3-model"
    path = _save(state, tmp_path / "text_encoder" / "model.safetensors")
    config.save_pretrained(path.parent)  # the released folder has its config.json: RoPE theta is not in the weights
    [match] = detect(path)
    assert match.spec.name == "z-image.text_encoder" and match.format == expected_format
    assert (
        match.config.num_hidden_layers == 3 and match.config.num_key_value_heads == encoder.config.num_key_value_heads
    )
    loaded = load_model(path, torch_dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, output_hidden_states=True).hidden_states[-2],
            encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2],
        )


def test_released_text_encoder_keys_detect_as_qwen3_4b():
    """The released layout on meta: the config inferred from the shapes is Qwen3-4B's."""
    from ds_models_z_image.specs import detect_text_encoder

    with torch.device("meta"):
        full = Qwen3ForCausalLM(qwen3_4b_config())
    shapes = {key: tuple(value.shape) for key, value in full.state_dict().items() if key != "lm_head.weight"}
    detection = detect_text_encoder(_ShapesView(shapes))
    released = qwen3_4b_config()
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert getattr(detection.config, name) == getattr(released, name), name
    assert detection.config.intermediate_size == 9728 and detection.config.vocab_size == 151936
    assert rope_theta(detection.config) == 1e6


class _ShapesView:
    """A HeaderView stand-in over key shapes only."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self._shapes = shapes
        self.config_json = None

    def keys(self):
        return iter(self._shapes)

    def __iter__(self):
        return iter(self._shapes)

    def __contains__(self, key):
        return key in self._shapes

    def shape(self, key):
        return self._shapes[key]
