"""FLUX.1 text encoders: transformers CLIP and T5 loaded through ds-loader, and prompt encoding that feeds the DiT
exactly what diffusers' ``FluxPipeline.encode_prompt`` does (same tiny components, all in eval mode)."""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from ds_loader import detect, load_model
from ds_models_flux import CLIP_SPEC, SPECS, T5_SPEC, FluxTextEncoders, PromptTruncatedWarning, load_tokenizers
from ds_vram import VRAMConfig

DISK = VRAMConfig(storage="disk", computation_device="cpu", computation_dtype=torch.float32, vram_limit=0)
PROMPTS = ["the cat and the dog", "a red house by the sea"]
LONG = " ".join(["the quick brown fox"] * 30)  # about 100 CLIP tokens and 150 T5 tokens


@pytest.fixture(scope="module")
def pipeline(flux_files) -> FluxPipeline:
    clip_tokenizer, t5_tokenizer = load_tokenizers(flux_files.repo)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=flux_files.autoencoder,
        text_encoder=flux_files.clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=flux_files.t5,
        tokenizer_2=t5_tokenizer,
        transformer=flux_files.transformer,
    )


@pytest.fixture(scope="module", params=["eager", "disk"])
def encoders(request, flux_files) -> FluxTextEncoders:
    """Our encoders loaded by ds-loader from the repository's folders (T5: shards with an index)."""
    vram = DISK if request.param == "disk" else None
    clip = load_model(flux_files.repo / "text_encoder", vram=vram)
    t5 = load_model(flux_files.repo / "text_encoder_2", vram=vram)
    return FluxTextEncoders(clip, t5, *load_tokenizers(flux_files.repo))


def _ids(length: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab - 1, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["folder", "all_in_one"])
@pytest.mark.parametrize("mode", ["eager", "disk"])
def test_loaded_encoders_equal_the_transformers_models(flux_files, layout: str, mode: str) -> None:
    vram = DISK if mode == "disk" else None
    if layout == "folder":
        clip = load_model(flux_files.repo / "text_encoder", vram=vram)
        t5 = load_model(flux_files.repo / "text_encoder_2", vram=vram)
    else:
        clip = load_model(flux_files.all_in_one, spec=CLIP_SPEC, vram=vram)
        t5 = load_model(flux_files.all_in_one, spec=T5_SPEC, vram=vram)
    clip_ids = _ids(77, flux_files.clip.config.vocab_size, 1)
    clip_ids[:, 10] = flux_files.clip.config.vocab_size - 1  # an end-of-text token for the pooled output
    t5_ids = _ids(24, flux_files.t5.config.vocab_size, 2)
    with torch.no_grad():
        for ours, theirs, ids in ((clip, flux_files.clip, clip_ids), (t5, flux_files.t5, t5_ids)):
            out, ref = ours(input_ids=ids), theirs(input_ids=ids)
            torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)
        torch.testing.assert_close(clip(input_ids=clip_ids).pooler_output, flux_files.clip(clip_ids).pooler_output)


def test_configs_are_inferred_from_shapes(flux_files) -> None:
    by_name = {m.spec.name: m for m in detect(flux_files.all_in_one, specs=SPECS)}  # no config.json here
    clip, t5 = by_name["flux.1.text_encoder_clip"].config, by_name["flux.1.text_encoder_t5"].config
    reference = flux_files.clip.config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(clip, field) == getattr(reference, field), field
    assert (clip.max_position_embeddings, clip.hidden_act, clip.eos_token_id) == (77, "quick_gelu", 2)
    reference = flux_files.t5.config
    for field in (
        "vocab_size",
        "d_model",
        "d_kv",
        "num_heads",
        "d_ff",
        "num_layers",
        "relative_attention_num_buckets",
    ):
        assert getattr(t5, field) == getattr(reference, field), field
    assert t5.is_gated_act and t5.dense_act_fn == "gelu_new"


@pytest.mark.parametrize("t5_sequence_length", [512, 256])
def test_encode_prompt_equals_diffusers(encoders, pipeline, t5_sequence_length: int) -> None:
    with torch.no_grad():
        hidden, pooled = encoders.encode_prompt(PROMPTS, t5_sequence_length=t5_sequence_length)
        ref_hidden, ref_pooled, text_ids = pipeline.encode_prompt(
            PROMPTS, prompt_2=None, device="cpu", max_sequence_length=t5_sequence_length
        )
    assert hidden.shape == (2, t5_sequence_length, 32) and pooled.shape == (2, 64)
    assert text_ids.shape == (t5_sequence_length, 3) and not text_ids.any()
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
    assert (pooled[0] - pooled[1]).abs().max() > 0.1  # the prompts are told apart


def test_the_reference_wiring_is_what_matters(encoders, pipeline) -> None:
    """No attention mask and padding to the full length: a mask, or a shorter padding, changes the output."""
    with torch.no_grad():
        hidden, _ = encoders.encode_prompt(PROMPTS[:1], t5_sequence_length=256)
        shorter, _ = encoders.encode_prompt(PROMPTS[:1], t5_sequence_length=64)
        tokens = encoders.t5_tokenizer(PROMPTS[:1], padding="max_length", max_length=256, return_tensors="pt")
        masked = pipeline.text_encoder_2(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    assert (hidden[:, :5] - shorter[:, :5]).abs().max() > 1e-3
    assert (hidden[:, :5] - masked[:, :5]).abs().max() > 1e-3


def test_long_prompts_are_truncated_with_a_warning(encoders, pipeline) -> None:
    with pytest.warns(PromptTruncatedWarning) as caught:
        hidden, pooled = encoders.encode_prompt([LONG, "the cat"], t5_sequence_length=64)
    messages = [str(w.message) for w in caught]
    clip_total = len(encoders.clip_tokenizer(LONG).input_ids)
    t5_total = len(encoders.t5_tokenizer(LONG).input_ids)
    assert any(
        f"CLIP: prompt 0 has {clip_total} tokens; the last {clip_total - 77} were dropped" in m for m in messages
    )
    assert any(f"T5: prompt 0 has {t5_total} tokens; the last {t5_total - 64} were dropped" in m for m in messages)
    assert not any("prompt 1" in m for m in messages)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_hidden, ref_pooled, _ = pipeline.encode_prompt([LONG, "the cat"], prompt_2=None, max_sequence_length=64)
    torch.testing.assert_close(hidden, ref_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-5, atol=1e-5)


def test_errors(flux_files, tmp_path) -> None:
    encoders = FluxTextEncoders(flux_files.clip, flux_files.t5, *load_tokenizers(flux_files.repo))
    with pytest.raises(ValueError, match=r"t5_sequence_length=1024 must be an integer in 1\.\.512"):
        encoders.encode_prompt("a cat", t5_sequence_length=1024)
    with pytest.raises(TypeError, match="prompt must be a string or a non-empty list of strings"):
        encoders.encode_prompt([])
    with pytest.raises(FileNotFoundError, match=r"tokenizer not found: a FLUX\.1 repository has tokenizer/"):
        load_tokenizers(tmp_path)


def test_t5_file_with_both_tied_embeddings_and_a_full_t5(flux_files, tmp_path) -> None:
    """Files hold the tied embedding as shared.weight, encoder.embed_tokens.weight or both; a full T5 file also has
    a decoder, which the encoder does not use."""
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in flux_files.t5.state_dict().items()}  # untied copies, as some files hold
    assert {"shared.weight", "encoder.embed_tokens.weight"} <= set(state)
    ids = _ids(12, flux_files.t5.config.vocab_size, 3)
    with torch.no_grad():
        ref = flux_files.t5(input_ids=ids).last_hidden_state
    variants = {
        "both": state,
        "embed_tokens_only": {k: v for k, v in state.items() if k != "shared.weight"},
        "full_t5": {
            **state,
            "decoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2),
            "lm_head.weight": torch.zeros(2, 2),
        },
    }
    for name, tensors in variants.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        model = load_model(tmp_path / f"{name}.safetensors", spec=T5_SPEC)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref, rtol=0, atol=0, msg=name)
