"""QwenImageDiT against diffusers' QwenImageTransformer2DModel: tiny-size parity (text-to-image, edit layouts,
padded prompts, zero_cond_t, ControlNet residuals), the released layout on ``meta``, and detection of the formats
the DiT is published in.

diffusers keeps the official parameter names, so its saved folder loads into ours with no conversion. Units: both
take sigma in [0, 1] and multiply by 1000 inside; both return the velocity for every image token.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from safetensors.torch import load_file, save_file

from ds_loader import DetectionError, Mismatch, detect, load_model, open_checkpoints
from ds_models_qwen_image.dit import (
    QwenImageDiT,
    QwenImageDiTConfig,
    pack_latents,
    rope_frequencies,
    unpack_latents,
)
from ds_models_qwen_image.dit_specs import DIT_SPEC, ZERO_COND_MARKER, rope_axes

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = QwenImageDiTConfig.tiny()
RELEASED_PARAMETERS = 20_430_401_088  # Qwen-Image's transformer (and -2512, -Edit, -Edit-2509, -Edit-2511)


def diffusers_kwargs(config: QwenImageDiTConfig) -> dict:
    return {
        "patch_size": config.patch_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.num_layers,
        "attention_head_dim": config.attention_head_dim,
        "num_attention_heads": config.num_attention_heads,
        "joint_attention_dim": config.joint_attention_dim,
        "axes_dims_rope": tuple(config.axes_dims_rope),
        "zero_cond_t": config.zero_cond_t,
    }


def randomize(model: torch.nn.Module) -> None:
    """Weights large enough that every path shows (norm weights near 1, the rest N(0, 0.15))."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0, 0.15)


def make_reference(config: QwenImageDiTConfig, seed: int = 0) -> QwenImageTransformer2DModel:
    torch.manual_seed(seed)
    model = QwenImageTransformer2DModel(**diffusers_kwargs(config)).eval()
    randomize(model)
    return model


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[QwenImageTransformer2DModel, str]:
    """A tiny diffusers model saved as Qwen/Qwen-Image's ``transformer/`` folder."""
    model = make_reference(TINY)
    folder = tmp_path_factory.mktemp("qwen_image") / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    return model, str(folder)


@pytest.fixture(scope="module")
def ours(reference) -> QwenImageDiT:
    return load_model(reference[1], torch_dtype=torch.float32, spec=DIT_SPEC).eval()


@pytest.fixture(scope="module")
def reference_2511(tmp_path_factory) -> tuple[QwenImageTransformer2DModel, str]:
    """The same weights as an Edit-2511 folder (its config.json says zero_cond_t)."""
    model = make_reference(dataclasses.replace(TINY, zero_cond_t=True))
    folder = tmp_path_factory.mktemp("qwen_image_2511") / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    return model, str(folder)


@pytest.fixture(scope="module")
def ours_2511(reference_2511) -> QwenImageDiT:
    return load_model(reference_2511[1], torch_dtype=torch.float32, spec=DIT_SPEC).eval()


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * expected.abs().max().item())


def inputs(shapes: list[tuple[int, int, int]], lengths: list[int], total: int = 12):
    b = len(lengths)
    n = sum(f * h * w for f, h, w in shapes)
    latents = torch.randn(b, n, TINY.in_channels)
    timestep = torch.linspace(0.35, 0.9, b)
    text = torch.randn(b, total, TINY.joint_attention_dim)
    mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    return latents, timestep, text, mask


def run_reference(model, latents, timestep, text, mask, shapes, samples=None) -> torch.Tensor:
    with torch.no_grad():
        return model(
            latents,
            text,
            mask,
            timestep,
            img_shapes=[shapes] * latents.shape[0],
            controlnet_block_samples=samples,
            return_dict=False,
        )[0]


T2I = [(1, 4, 6)]
EDIT = [(1, 4, 6), (1, 5, 3), (1, 2, 4)]  # the target, then two references of other sizes (odd rows included)


def test_loads_the_diffusers_folder_strictly(reference, ours):
    model, folder = reference
    assert isinstance(ours, QwenImageDiT) and ours.config == TINY
    state = load_file(f"{folder}/diffusion_pytorch_model.safetensors")
    assert set(ours.state_dict()) == set(state) == set(model.state_dict())
    # the reverse direction: our state dict loads into diffusers' class strictly
    twin = QwenImageTransformer2DModel(**diffusers_kwargs(TINY))
    twin.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize(
    ("shapes", "lengths"),
    [(T2I, [12, 5]), (T2I, [12, 12]), (EDIT, [7, 12]), (EDIT, [9])],
    ids=["t2i-padded", "t2i-all-valid", "edit-padded", "edit-single"],
)
def test_matches_diffusers(reference, ours, shapes, lengths):
    model, _ = reference
    latents, timestep, text, mask = inputs(shapes, lengths)
    expected = run_reference(model, latents, timestep, text, mask, shapes)
    with torch.no_grad():
        got = ours(latents, timestep, text, mask, shapes)
    assert expected.abs().mean() > 0.1
    assert_matches(got, expected)


@pytest.mark.parametrize("shapes", [EDIT, EDIT[:2], T2I], ids=["two-references", "one-reference", "t2i"])
def test_zero_cond_t_matches_diffusers(reference_2511, ours_2511, ours, shapes):
    model, _ = reference_2511
    assert ours_2511.config.zero_cond_t
    latents, timestep, text, mask = inputs(shapes, [10, 6])
    expected = run_reference(model, latents, timestep, text, mask, shapes)
    with torch.no_grad():
        got = ours_2511(latents, timestep, text, mask, shapes)
        plain = ours(latents, timestep, text, mask, shapes)
    assert_matches(got, expected)
    target = shapes[0][1] * shapes[0][2]
    if len(shapes) > 1:  # the references' modulation at t = 0 changes the result
        assert (got[:, :target] - plain[:, :target]).abs().max() > 1e-2
    else:  # without references, zero_cond_t is the plain model
        assert_matches(got, plain)


def test_bf16_time_embedding_equals_diffusers(reference, ours):
    """diffusers casts sigma to the computation dtype before its float32 sinusoid; so do we, bit for bit."""
    model, _ = reference
    sigma = torch.tensor([0.3, 0.877, 1.0])
    probe = torch.zeros(3, 1, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = copy.deepcopy(model.time_text_embed).to(torch.bfloat16)(sigma.to(torch.bfloat16), probe)
        got = copy.deepcopy(ours.time_text_embed).to(torch.bfloat16)(sigma, torch.bfloat16)
    assert torch.equal(got, expected)


def test_no_mask_means_every_prompt_token_is_valid(ours):
    latents, timestep, text, mask = inputs(EDIT, [12, 12])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(latents, timestep, text, None, EDIT), ours(latents, timestep, text, mask, EDIT)
        )


def test_padded_prompt_tokens_are_ignored(ours):
    latents, timestep, text, mask = inputs(T2I, [6])
    with torch.no_grad():
        base = ours(latents, timestep, text, mask, T2I)
        moved = text.clone()
        moved[:, 6:] += 3.0
        torch.testing.assert_close(ours(latents, timestep, moved, mask, T2I), base)
        assert (ours(latents, timestep + 0.05, text, mask, T2I) - base).abs().max() > 1e-2
        assert (ours(latents, timestep, moved, None, T2I) - base).abs().max() > 1e-2
        torch.testing.assert_close(ours(latents + 1e-5, timestep, text, mask, T2I), base, rtol=1e-3, atol=1e-3)


def test_block_residual_matches_controlnet_block_samples(reference, ours):
    """diffusers adds ``controlnet_block_samples[i // ceil(layers / samples)]`` after block i; the same residual
    through our hook gives the same output."""
    model, _ = reference
    latents, timestep, text, mask = inputs(EDIT, [12, 8])
    samples = [0.5 * torch.randn(2, latents.shape[1], TINY.inner_dim)]
    expected = run_reference(model, latents, timestep, text, mask, EDIT, samples)
    calls = []

    def residual(index: int, image: torch.Tensor) -> torch.Tensor:
        calls.append((index, tuple(image.shape)))
        return samples[0]

    with torch.no_grad():
        got = ours(latents, timestep, text, mask, EDIT, block_residual=residual)
        plain = ours(latents, timestep, text, mask, EDIT)
    assert calls == [(i, (2, latents.shape[1], TINY.inner_dim)) for i in range(TINY.num_layers)]
    assert_matches(got, expected)
    assert (got - plain).abs().max() > 1e-2


def test_a_shorter_residual_touches_only_the_first_tokens(ours):
    """A ``(B, M, dim)`` residual is added to the first M image tokens (the target's); None adds nothing."""
    latents, timestep, text, mask = inputs(EDIT, [12])
    target = 4 * 6
    extra = torch.randn(1, target, TINY.inner_dim)
    full = torch.zeros(1, latents.shape[1], TINY.inner_dim)
    full[:, :target] = extra
    last = TINY.num_layers - 1
    with torch.no_grad():
        plain = ours(latents, timestep, text, mask, EDIT, block_residual=lambda i, x: None)
        got = ours(latents, timestep, text, mask, EDIT, block_residual=lambda i, x: extra if i == last else None)
        padded = ours(latents, timestep, text, mask, EDIT, block_residual=lambda i, x: full if i == last else None)
    torch.testing.assert_close(plain, ours(latents, timestep, text, mask, EDIT))
    torch.testing.assert_close(got, padded)
    assert (got[:, :target] - plain[:, :target]).abs().max() > 1e-2
    # after the last block, the reference tokens change only through the output norm, which is per token
    torch.testing.assert_close(got[:, target:], plain[:, target:])


def test_rope_matches_diffusers():
    """Centred rows and columns, frame index per image, text after max(h // 2, w // 2): diffusers' tables."""
    shapes = [(1, 5, 8), (1, 7, 3), (1, 2, 2)]
    reference = QwenEmbedRope(theta=10000, axes_dim=list(TINY.axes_dims_rope), scale_rope=True)
    expected_image, expected_text = reference([shapes], max_txt_seq_len=9, device=torch.device("cpu"))
    image, text = rope_frequencies(shapes, 9, TINY.axes_dims_rope)
    assert torch.equal(image, expected_image) and torch.equal(text, expected_text)
    # text token 0 sits at max(5 // 2, 8 // 2, 7 // 2, 3 // 2, ...) = 4 on every axis
    angles = 4.0 * (1.0 / 10000 ** (torch.arange(0, 8, 2) / 8))
    assert torch.allclose(text[0, :4], torch.polar(torch.ones(4), angles))


def test_pack_latents_matches_diffusers():
    from diffusers import QwenImagePipeline

    latents = torch.randn(2, 17, 6, 10)
    packed = pack_latents(latents)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(latents, 2, 17, 6, 10))
    assert torch.equal(unpack_latents(packed, 6, 10), latents)


def test_bad_inputs_name_the_argument(ours):
    latents, timestep, text, mask = inputs(T2I, [12])
    with pytest.raises(ValueError, match="latents must be packed tokens"):
        ours(latents[..., :16], timestep, text, mask, T2I)
    with pytest.raises(ValueError, match="timestep has shape"):
        ours(latents, timestep[None], text, mask, T2I)
    with pytest.raises(ValueError, match="prompt_embeds has shape"):
        ours(latents, timestep, text[..., :8], mask, T2I)
    with pytest.raises(ValueError, match="prompt_mask must be"):
        ours(latents, timestep, text, mask.long(), T2I)
    with pytest.raises(ValueError, match="give 48 tokens but latents have 24"):
        ours(latents, timestep, text, mask, [(1, 4, 6), (1, 4, 6)])
    with pytest.raises(ValueError, match="image_shapes"):
        ours(latents, timestep, text, mask, [])
    with pytest.raises(ValueError, match="block_residual for block 0"):
        ours(latents, timestep, text, mask, T2I, block_residual=lambda i, x: torch.zeros(1, 30, TINY.inner_dim))


def test_config_validation():
    with pytest.raises(ValueError, match="axes_dims_rope"):
        dataclasses.replace(TINY, axes_dims_rope=(8, 8, 8))
    with pytest.raises(ValueError, match="num_layers"):
        dataclasses.replace(TINY, num_layers=0)
    with pytest.raises(ValueError, match="unknown Qwen-Image DiT preset"):
        QwenImageDiTConfig.preset("qwen-image-xl")
    assert QwenImageDiTConfig.preset("qwen_image_edit_2511") == QwenImageDiTConfig.edit_2511()
    assert QwenImageDiTConfig.preset("qwen-image-2512") == QwenImageDiTConfig.qwen_image()
    assert QwenImageDiTConfig.edit_2511().zero_cond_t and not QwenImageDiTConfig.qwen_image().zero_cond_t


# ---------------------------------------------------------------------------------------------- full-size layout
def test_released_layout_and_parameter_count_match_diffusers():
    config = QwenImageDiTConfig.qwen_image()
    with torch.device("meta"):
        ours = QwenImageDiT(config)
        theirs = QwenImageTransformer2DModel()  # diffusers' defaults are the released config
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in theirs.state_dict().items()}
    assert shapes["transformer_blocks.59.attn.norm_added_k.weight"] == (128,)
    assert shapes["transformer_blocks.0.img_mod.1.weight"] == (6 * 3072, 3072)
    assert shapes["transformer_blocks.0.img_mlp.net.0.proj.weight"] == (4 * 3072, 3072)
    assert shapes["txt_in.weight"] == (3072, 3584) and shapes["proj_out.weight"] == (64, 3072)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == RELEASED_PARAMETERS


# ---------------------------------------------------------------------------------------------- detection
def test_detects_the_diffusers_folder(reference, reference_2511):
    (match,) = detect(reference[1], specs=[DIT_SPEC])
    assert match.format == "official" and match.config == TINY
    (match,) = detect(reference_2511[1], specs=[DIT_SPEC])
    assert match.config == dataclasses.replace(TINY, zero_cond_t=True)


@pytest.fixture(scope="module")
def state(reference) -> dict[str, torch.Tensor]:
    return {key: value.contiguous() for key, value in reference[0].state_dict().items()}


def test_comfyui_prefixed_file_with_the_2511_marker(tmp_path, state, ours_2511):
    """A ComfyUI checkpoint: the DiT under ``model.diffusion_model.``, the Edit-2511 marker, and other
    components' keys, which are dropped."""
    tensors = {"model.diffusion_model." + key: value for key, value in state.items()}
    tensors["model.diffusion_model." + ZERO_COND_MARKER] = torch.tensor([])
    tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4)
    path = tmp_path / "qwen_image_edit_2511_aio.safetensors"
    save_file(tensors, path)
    (match,) = detect(path, specs=[DIT_SPEC])
    assert match.format == "prefixed"
    assert match.config == dataclasses.replace(TINY, zero_cond_t=True)
    model = load_model(path, torch_dtype=torch.float32, spec=DIT_SPEC)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ours_2511.state_dict()[key]), key


def test_comfyui_fp8_file(tmp_path, state):
    """ComfyUI's ``qwen_image_fp8_e4m3fn.safetensors``: the official names, float8 weights, upcast on load."""
    tensors = {key: value.to(torch.float8_e4m3fn) if value.ndim == 2 else value for key, value in state.items()}
    tensors[ZERO_COND_MARKER] = torch.tensor([])
    path = tmp_path / "qwen_image_edit_2511_fp8_e4m3fn.safetensors"
    save_file(tensors, path)
    (match,) = detect(path, specs=[DIT_SPEC])
    assert match.format == "official-fp8" and match.config.zero_cond_t
    model = load_model(path, spec=DIT_SPEC)
    weight = model.state_dict()["transformer_blocks.0.attn.to_q.weight"]
    assert weight.dtype == torch.bfloat16
    expected = tensors["transformer_blocks.0.attn.to_q.weight"].to(torch.bfloat16)
    assert torch.equal(weight, expected)


def test_rejects_what_it_cannot_run(tmp_path, state):
    layered = dict(state, **{"time_text_embed.addition_t_embedding.weight": torch.zeros(2, TINY.inner_dim)})
    save_file(layered, tmp_path / "layered.safetensors")
    (checkpoint,) = open_checkpoints(tmp_path / "layered.safetensors")
    result = DIT_SPEC.detect(checkpoint.view())
    assert isinstance(result, Mismatch) and "Layered" in result.reason and result.closeness > 0.8
    scaled = dict(state, **{"transformer_blocks.0.attn.to_q.scale_weight": torch.ones(1)})
    save_file(scaled, tmp_path / "scaled.safetensors")
    with pytest.raises(DetectionError, match="scaled FP8"):
        load_model(tmp_path / "scaled.safetensors", spec=DIT_SPEC)
    other = {"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}
    save_file(other, tmp_path / "wan.safetensors")
    with pytest.raises(DetectionError):
        load_model(tmp_path / "wan.safetensors", spec=DIT_SPEC)


def test_config_json_overrides_axes(tmp_path, state):
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "QwenImageTransformer2DModel", "axes_dims_rope": [4, 14, 14], "zero_cond_t": False}
    (folder / "config.json").write_text(json.dumps(config))
    (match,) = detect(folder, specs=[DIT_SPEC])
    assert match.config.axes_dims_rope == (4, 14, 14)
    assert rope_axes(128) == (16, 56, 56) and sum(rope_axes(64)) == 64
