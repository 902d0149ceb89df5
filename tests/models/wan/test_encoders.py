"""Wan's umT5 text encoder and CLIP ViT-H/14 image encoder: files in the official ``.pth`` and diffusers layouts,
loaded through ds_loader, against the transformers models, an independent reading of the official forward
(``wan/modules/t5.py``, ``clip.py``), and diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline`` encoding."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import WanImageToVideoPipeline, WanPipeline
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionModel, T5Config, T5EncoderModel, UMT5EncoderModel

from ds_loader import CheckpointError, DetectionError, Mismatch, StateDictMismatchError, detect, load_model, registry
from ds_loader.checkpoint import Checkpoint
from ds_models_wan.encoder_specs import ENCODER_SPECS, IMAGE_ENCODER_SPEC, TEXT_ENCODER_SPEC, detect_text_encoder
from ds_models_wan.image_encoder import (
    CLIP_MEAN,
    CLIP_STD,
    build_clip_vision_model,
    clip_vit_h14_config,
    encode_image,
    tiny_clip_vision_config,
    vision_inner_prefix,
)
from ds_models_wan.text_encoder import (
    PromptTruncatedWarning,
    clean_prompt,
    encode_prompt,
    load_wan_tokenizer,
    tiny_umt5_config,
    umt5_xxl_config,
)
from ds_vram import TensorInfo
from tests.models.flux.conftest import write_t5_tokenizer  # umT5's layout: <pad> 0, </s> 1, <unk> 2

PROMPTS = ["the cat  and the\tdog", "a  fox &amp; the owl", "zebra"]


# --- writers (the pipeline tests may import these) -------------------------------------------------------------


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every token, position, patch and layer changes the output clearly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and parameter.ndim == 1:
                parameter.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
            elif parameter.ndim >= 2 and "embed" not in name and "relative_attention_bias" not in name:
                parameter.copy_(noise / math.prod(parameter.shape[1:]) ** 0.5)
            else:
                parameter.copy_(0.5 * noise)


def official_t5_state(model: UMT5EncoderModel) -> dict[str, torch.Tensor]:
    """The transformers weights under the official ``T5Encoder`` names (``models_t5_umt5-xxl-enc-bf16.pth``)."""
    state = model.state_dict()
    names = {
        "attn.q": "layer.0.SelfAttention.q",
        "attn.k": "layer.0.SelfAttention.k",
        "attn.v": "layer.0.SelfAttention.v",
        "attn.o": "layer.0.SelfAttention.o",
        "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
        "norm1": "layer.0.layer_norm",
        "norm2": "layer.1.layer_norm",
        "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
        "ffn.fc1": "layer.1.DenseReluDense.wi_1",
        "ffn.fc2": "layer.1.DenseReluDense.wo",
    }
    out = {"token_embedding.weight": state["shared.weight"], "norm.weight": state["encoder.final_layer_norm.weight"]}
    for i in range(model.config.num_layers):
        for ours, theirs in names.items():
            out[f"blocks.{i}.{ours}.weight"] = state[f"encoder.block.{i}.{theirs}.weight"]
    return {k: v.clone() for k, v in out.items()}


def official_clip_state(model: CLIPVisionModel) -> dict[str, torch.Tensor]:
    """The transformers weights under open-clip's ``visual.*`` names, with a text tower and ``log_scale`` beside."""
    state = {k.removeprefix(vision_inner_prefix()): v for k, v in model.state_dict().items()}
    width = model.config.hidden_size
    out = {
        "visual.patch_embedding.weight": state["embeddings.patch_embedding.weight"],
        "visual.cls_embedding": state["embeddings.class_embedding"].reshape(1, 1, width),
        "visual.pos_embedding": state["embeddings.position_embedding.weight"][None],
        "visual.head": torch.randn(width, 16),
        "log_scale": torch.tensor(2.6),
        "textual.token_embedding.weight": torch.randn(10, 8),
    }
    for p in ("weight", "bias"):
        out[f"visual.pre_norm.{p}"] = state[f"pre_layrnorm.{p}"]
        out[f"visual.post_norm.{p}"] = state[f"post_layernorm.{p}"]
        for i in range(model.config.num_hidden_layers):
            b, o = f"encoder.layers.{i}.", f"visual.transformer.{i}."
            qkv = [state[f"{b}self_attn.{n}_proj.{p}"] for n in "qkv"]
            out[f"{o}attn.to_qkv.{p}"] = torch.cat(qkv)
            out[f"{o}attn.proj.{p}"] = state[f"{b}self_attn.out_proj.{p}"]
            out[f"{o}norm1.{p}"] = state[f"{b}layer_norm1.{p}"]
            out[f"{o}norm2.{p}"] = state[f"{b}layer_norm2.{p}"]
            out[f"{o}mlp.0.{p}"] = state[f"{b}mlp.fc1.{p}"]
            out[f"{o}mlp.2.{p}"] = state[f"{b}mlp.fc2.{p}"]
    return {k: v.clone() for k, v in out.items()}


# --- independent readings of the official forward passes -----------------------------------------------------


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _buckets(length: int, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = rel.abs()
    large = exact + (torch.log(distance.float() / exact) / math.log(max_dist / exact) * (half - exact)).long()
    large = large.clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(distance < exact, distance, large)


def official_t5(state: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's ``T5Encoder.forward`` read from its source: per-block bias, no score scaling, fc1 * gelu_tanh(gate)."""
    x = state["token_embedding.weight"][ids]
    b, length, _ = x.shape
    buckets = _buckets(length)
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(blocks):
        w = {k.removeprefix(f"blocks.{i}."): v for k, v in state.items() if k.startswith(f"blocks.{i}.")}
        h = _rms(x, w["norm1.weight"])
        q, k, v = (F.linear(h, w[f"attn.{n}.weight"]).view(b, length, heads, -1) for n in "qkv")
        bias = w["pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask.view(b, 1, 1, length) == 0, torch.finfo(x.dtype).min)
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, -1), w["attn.o.weight"])
        h = _rms(x, w["norm2.weight"])
        gated = F.linear(h, w["ffn.fc1.weight"]) * F.gelu(F.linear(h, w["ffn.gate.0.weight"]), approximate="tanh")
        x = x + F.linear(gated, w["ffn.fc2.weight"])
    return _rms(x, state["norm.weight"])


def official_clip(state: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """open-clip's ``VisionTransformer.forward(use_31_block=True)`` read from Wan's ``clip.py``."""
    weight = state["visual.patch_embedding.weight"]
    x = F.conv2d(pixels, weight, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state["visual.cls_embedding"].expand(x.shape[0], -1, -1), x], dim=1) + state["visual.pos_embedding"]
    width = x.shape[-1]
    x = F.layer_norm(x, (width,), state["visual.pre_norm.weight"], state["visual.pre_norm.bias"], 1e-5)
    blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("visual.transformer."))
    for i in range(blocks - 1):
        w = {k.removeprefix(f"visual.transformer.{i}."): v for k, v in state.items() if f"transformer.{i}." in k}
        h = F.layer_norm(x, (width,), w["norm1.weight"], w["norm1.bias"], 1e-5)
        b, s, _ = h.shape
        q, k, v = F.linear(h, w["attn.to_qkv.weight"], w["attn.to_qkv.bias"]).view(b, s, 3, heads, -1).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + F.linear(out.transpose(1, 2).reshape(b, s, width), w["attn.proj.weight"], w["attn.proj.bias"])
        h = F.layer_norm(x, (width,), w["norm2.weight"], w["norm2.bias"], 1e-5)
        x = x + F.linear(F.gelu(F.linear(h, w["mlp.0.weight"], w["mlp.0.bias"])), w["mlp.2.weight"], w["mlp.2.bias"])
    return x


# --- fixture -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("wan_encoders")
    ns = SimpleNamespace(root=root)
    ns.vocab = write_t5_tokenizer(root / "Wan2.1-official" / "google" / "umt5-xxl")
    write_t5_tokenizer(root / "Wan2.1-diffusers" / "tokenizer")
    ns.t5 = UMT5EncoderModel(tiny_umt5_config(ns.vocab)).eval()
    randomize(ns.t5, seed=3)
    ns.clip = CLIPVisionModel(tiny_clip_vision_config()).eval()
    randomize(ns.clip, seed=4)

    ns.t5_state, ns.clip_state = official_t5_state(ns.t5), official_clip_state(ns.clip)
    ns.t5_pth = root / "Wan2.1-official" / "models_t5_umt5-xxl-enc-bf16.pth"
    ns.clip_pth = root / "Wan2.1-official" / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(ns.t5_state, ns.t5_pth)
    torch.save(ns.clip_state, ns.clip_pth)

    ns.repo = root / "Wan2.1-diffusers"
    (ns.repo / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    ns.t5.save_pretrained(ns.repo / "text_encoder", max_shard_size="40KB")
    ns.clip.save_pretrained(ns.repo / "image_encoder")
    # As the released diffusers folders hold them (saved by transformers 4): "vision_model." keys, a projection,
    # the position_ids buffer; and a UMT5 file with both tied embedding names.
    ns.clip_v4 = root / "image_encoder_v4"
    ns.clip_v4.mkdir()
    state = {"vision_model." + k.removeprefix(vision_inner_prefix()): v for k, v in ns.clip.state_dict().items()}
    state["visual_projection.weight"] = torch.randn(16, 32)
    state["vision_model.embeddings.position_ids"] = torch.arange(5)[None]
    save_file({k: v.contiguous() for k, v in state.items()}, ns.clip_v4 / "model.safetensors")
    config = {**ns.clip.config.to_dict(), "architectures": ["CLIPVisionModelWithProjection"]}
    (ns.clip_v4 / "config.json").write_text(json.dumps(config))
    ns.t5_both = root / "umt5_both.safetensors"
    save_file({k: v.clone() for k, v in ns.t5.state_dict().items()}, ns.t5_both)
    return ns


def _ids(files: SimpleNamespace, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    tokenizer = load_wan_tokenizer(files.root / "Wan2.1-official")
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


def _pixels(size: int, seed: int, count: int = 2) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --- text encoder ------------------------------------------------------------------------------------------------


def test_t5_official_pth_loads_and_matches_transformers_and_the_official_forward(files):
    model = load_model(files.t5_pth, spec=TEXT_ENCODER_SPEC)
    assert isinstance(model, UMT5EncoderModel) and not model.training
    assert (model.config.d_model, model.config.num_heads, model.config.d_kv, model.config.num_layers) == (32, 4, 8, 2)
    ids, mask = _ids(files)
    ours = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, files.t5(input_ids=ids, attention_mask=mask).last_hidden_state)
    reference = official_t5(files.t5_state, ids, mask, heads=4)
    valid = mask.bool()
    torch.testing.assert_close(ours[valid], reference[valid], rtol=1e-5, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 0.1  # prompts differ clearly


@pytest.mark.parametrize("where", ["folder", "repo", "both_names"])
def test_t5_diffusers_layouts_load(files, where):
    target = {"folder": files.repo / "text_encoder", "repo": files.repo, "both_names": files.t5_both}[where]
    if where == "folder":
        assert len(list(target.glob("*.safetensors"))) > 1  # sharded with an index
    model = load_model(target, spec=TEXT_ENCODER_SPEC)
    ids, mask = _ids(files)
    expected = files.t5(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, expected)


def test_encode_prompt_matches_diffusers_wan_pipeline(files):
    tokenizer = load_wan_tokenizer(files.repo)
    ours = encode_prompt(files.t5, tokenizer, PROMPTS, max_length=24)
    host = SimpleNamespace(tokenizer=tokenizer, text_encoder=files.t5, _execution_device=torch.device("cpu"))
    theirs = WanPipeline._get_t5_prompt_embeds(host, prompt=PROMPTS, max_sequence_length=24)
    assert ours.shape == (3, 24, 32)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    lengths = tokenizer([clean_prompt(p) for p in PROMPTS], padding=False).attention_mask
    for row, tokens in zip(ours, lengths, strict=True):
        assert row[len(tokens) :].abs().max() == 0 and row[: len(tokens)].abs().min() > 0


def test_encode_prompt_truncates_with_a_warning_and_checks_arguments(files):
    tokenizer = load_wan_tokenizer(files.root / "Wan2.1-official" / "google" / "umt5-xxl")
    with pytest.warns(PromptTruncatedWarning, match="prompt 0 has 13 tokens; the last 5 were dropped"):
        short = encode_prompt(files.t5, tokenizer, "abcdefghijkl", max_length=8)
    assert short.shape == (1, 8, 32) and short.abs().amin(dim=-1).min() > 0  # all 8 positions are prompt
    with pytest.raises(ValueError, match="max_length=513"):
        encode_prompt(files.t5, tokenizer, "a", max_length=513)
    with pytest.raises(TypeError, match="prompts must be"):
        encode_prompt(files.t5, tokenizer, [])
    with pytest.raises(FileNotFoundError, match="google/umt5-xxl"):
        load_wan_tokenizer(files.root / "image_encoder_v4")


# --- image encoder -----------------------------------------------------------------------------------------------


def test_clip_official_pth_loads_and_matches_the_official_forward(files):
    model = load_model(files.clip_pth, spec=IMAGE_ENCODER_SPEC)
    assert isinstance(model, CLIPVisionModel)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size) == (
        32,
        3,
        2,
        28,
    )
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-5
    images = _pixels(40, seed=1)  # not 224-like: encode_image resizes as the official code does
    tokens = encode_image(model, images)
    assert tokens.shape == (2, 5, 32)
    pixels = F.interpolate(images, size=(28, 28), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    reference = official_clip(files.clip_state, ((pixels + 1) / 2 - mean) / std, heads=2)
    torch.testing.assert_close(tokens, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tokens, encode_image(files.clip, images))
    assert (tokens[0] - tokens[1]).abs().max() > 0.1


@pytest.mark.parametrize("where", ["folder", "repo", "transformers4_with_projection"])
def test_clip_diffusers_layouts_load(files, where):
    target = {
        "folder": files.repo / "image_encoder",
        "repo": files.repo,
        "transformers4_with_projection": files.clip_v4,
    }
    model = load_model(target[where], spec=IMAGE_ENCODER_SPEC)
    images = _pixels(28, seed=2)
    torch.testing.assert_close(encode_image(model, images), encode_image(files.clip, images), rtol=0, atol=0)


def test_encode_image_matches_diffusers_wan_i2v_pipeline(files):
    generator = np.random.default_rng(5)
    arrays = [generator.integers(0, 256, (28, 28, 3), dtype=np.uint8) for _ in range(2)]
    processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    host = SimpleNamespace(image_processor=processor, image_encoder=files.clip, _execution_device=torch.device("cpu"))
    theirs = WanImageToVideoPipeline.encode_image(host, [Image.fromarray(a) for a in arrays])
    images = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 127.5 - 1 for a in arrays])
    torch.testing.assert_close(encode_image(files.clip, images), theirs, rtol=1e-5, atol=1e-5)


def test_encode_image_checks_its_input(files):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(3, 28, 28\)"):
        encode_image(files.clip, torch.zeros(3, 28, 28))
    with pytest.raises(ValueError, match="floating point"):
        encode_image(files.clip, torch.zeros(1, 3, 28, 28, dtype=torch.uint8))


# --- detection, full-size layouts, bad files -----------------------------------------------------------------------


def _all_specs():
    names = {spec.name for spec in ENCODER_SPECS}
    return [*(s for s in registry.specs() if s.name not in names), *ENCODER_SPECS]


def test_detection_picks_exactly_our_spec_among_all_families(files):
    cases = {
        files.t5_pth: ("wan.text_encoder", "official"),
        files.repo / "text_encoder": ("wan.text_encoder", "transformers"),
        files.clip_pth: ("wan.image_encoder", "official"),
        files.clip_v4: ("wan.image_encoder", "transformers"),
    }
    for path, (name, fmt) in cases.items():
        matches = detect(path, specs=_all_specs())
        assert [(m.spec.name, m.format) for m in matches] == [(name, fmt)], path
    assert {m.spec.name for m in detect(files.repo, specs=_all_specs())} == {"wan.text_encoder", "wan.image_encoder"}


class _Shapes:
    """Header-only stand-in for a full-size checkpoint: key names and shapes, no data."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def keys(self):
        return iter(self.shapes)

    def __contains__(self, key):
        return key in self.shapes

    def info(self, key):
        return TensorInfo(torch.bfloat16, tuple(self.shapes[key]))

    def get(self, key):
        raise AssertionError("detection must not read tensor data")


def _meta_model(spec, config) -> torch.nn.Module:
    with torch.device("meta"):
        return spec.create(config)


def test_full_size_official_layouts_give_the_released_configs():
    from ds_loader.load import validate_weights

    t5 = _meta_model(TEXT_ENCODER_SPEC, umt5_xxl_config())
    clip = _meta_model(IMAGE_ENCODER_SPEC, clip_vit_h14_config())
    for spec, model, state, released, fields in (
        (TEXT_ENCODER_SPEC, t5, official_t5_state(t5), umt5_xxl_config(), ("d_model", "d_ff", "num_heads", "d_kv")),
        (IMAGE_ENCODER_SPEC, clip, official_clip_state(clip), clip_vit_h14_config(), ("hidden_size", "image_size")),
    ):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        checkpoint = Checkpoint(_Shapes(shapes), [Path("/nonexistent/official.pth")])
        result = spec.detect(checkpoint.view())
        assert result.format == "official"
        expected = released.to_dict()
        got = result.config.to_dict()
        for field in (
            *fields,
            "num_layers",
            "num_hidden_layers",
            "vocab_size",
            "intermediate_size",
            "num_attention_heads",
        ):
            assert got.get(field) == expected.get(field), field
        match = SimpleNamespace(spec=spec, format="official", config=result.config, checkpoint=checkpoint)
        validate_weights(model, spec.recipe("official").apply(checkpoint), match)
    assert shapes["visual.pos_embedding"] == (1, 257, 1280)
    assert clip.config.hidden_act == "gelu"


def test_t5_not_umt5_and_unrelated_files_are_refused(files, tmp_path):
    t5 = T5EncoderModel(T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=2, num_heads=2))
    path = tmp_path / "t5.safetensors"
    save_file({k: v.clone() for k, v in t5.state_dict().items()}, path)
    from ds_loader import open_checkpoints

    result = detect_text_encoder(open_checkpoints(path)[0].view())
    assert isinstance(result, Mismatch) and "not umT5" in result.reason
    with pytest.raises(DetectionError, match=r"wan\.text_encoder"):
        load_model(files.clip_pth, spec=TEXT_ENCODER_SPEC)
    with pytest.raises(DetectionError, match=r"wan\.image_encoder"):
        load_model(files.t5_pth, spec=IMAGE_ENCODER_SPEC)


def test_missing_key_is_named_with_the_file(files, tmp_path):
    state = dict(files.t5_state)
    del state["blocks.1.ffn.fc1.weight"]
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(state, path)
    with pytest.raises(StateDictMismatchError, match=r"(?s)models_t5.*1 missing.*block\.1\.layer\.1\.DenseReluDense"):
        load_model(path, spec=TEXT_ENCODER_SPEC)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_a_payload_does_not_run(files, tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save({**files.clip_state, "visual.extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(path, spec=IMAGE_ENCODER_SPEC)
    assert not marker.exists()


def test_build_makes_position_ids_on_the_cpu():
    with torch.device("meta"):
        model = build_clip_vision_model(tiny_clip_vision_config())
    buffer = model.get_submodule(vision_inner_prefix() + "embeddings").position_ids
    assert buffer.device.type == "cpu" and buffer.tolist() == [[0, 1, 2, 3, 4]]
