"""The Qwen-Image ControlNets: InstantX's Union (and Inpainting) against diffusers' ``QwenImageControlNetModel`` and
``controlnet_block_samples``; DiffSynth-Studio's blockwise ControlNet (Canny, Depth, Inpaint), which no library
we can install implements, against diffusers' transformer with the blockwise math written out by hand in this file
and applied through forward hooks, as DiffSynth-Studio's ``model_fn_qwen_image`` applies it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers import QwenImageControlNetModel, QwenImageMultiControlNetModel, QwenImageTransformer2DModel
from safetensors.torch import save_file

from ds_loader import detect, load_model
from ds_models_qwen_image.controlnet import (
    BLOCKWISE_CONTROLNET_SPEC,
    CONTROLNET_SPECS,
    UNION_CONTROLNET_SPEC,
    QwenImageBlockwiseControlNet,
    QwenImageBlockwiseControlNetConfig,
    QwenImageControlNetUnion,
    QwenImageControlNetUnionConfig,
    inpaint_conditioning,
    mask_control_image,
    sample_residual,
    sum_block_residuals,
)
from ds_models_qwen_image.dit import QwenImageDiT, QwenImageDiTConfig, pack_latents
from ds_models_qwen_image.dit_specs import DIT_SPEC
from tests.models.qwen_image.test_dit import assert_matches, diffusers_kwargs, randomize

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = QwenImageDiTConfig.tiny()
DIT5 = dataclasses.replace(TINY, num_layers=5)  # 5 blocks, 2 ControlNet samples: interval ceil(5 / 2) = 3
TARGET = (1, 4, 6)
EDIT = [TARGET, (1, 3, 5)]


def dit_pair(config: QwenImageDiTConfig, seed: int = 0) -> tuple[QwenImageTransformer2DModel, QwenImageDiT]:
    torch.manual_seed(seed)
    reference = QwenImageTransformer2DModel(**diffusers_kwargs(config)).eval()
    randomize(reference)
    ours = QwenImageDiT(config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours.eval()


def inputs(shapes, lengths, channels: int = 64, total: int = 10):
    b = len(lengths)
    n = sum(f * h * w for f, h, w in shapes)
    target = math.prod(shapes[0])
    latents = torch.randn(b, n, 64)
    timestep = torch.linspace(0.4, 0.8, b)
    text = torch.randn(b, total, TINY.joint_attention_dim)
    mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    control = torch.randn(b, target, channels)
    return latents, timestep, text, mask, control


# ---------------------------------------------------------------------------------------------- InstantX Union
@pytest.fixture(scope="module")
def dit5():
    return dit_pair(DIT5)


@pytest.fixture(scope="module", params=[0, 4], ids=["union", "inpainting"])
def union_pair(request, tmp_path_factory):
    """(diffusers ControlNet, ours loaded from its saved folder through detection)."""
    extra = request.param
    torch.manual_seed(1)
    reference = QwenImageControlNetModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=TINY.attention_head_dim,
        num_attention_heads=TINY.num_attention_heads,
        joint_attention_dim=TINY.joint_attention_dim,
        axes_dims_rope=TINY.axes_dims_rope,
        extra_condition_channels=extra,
    ).eval()
    randomize(reference)  # diffusers zero-initialises the control projections
    folder = tmp_path_factory.mktemp("qwen_image_controlnet") / f"controlnet-{extra}"
    reference.save_pretrained(folder, safe_serialization=True)
    (match,) = detect(folder, specs=[DIT_SPEC, *CONTROLNET_SPECS])
    assert match.spec is UNION_CONTROLNET_SPEC and match.format == "diffusers"
    expected = dataclasses.replace(QwenImageControlNetUnionConfig.tiny(), num_layers=2, extra_condition_channels=extra)
    assert match.config == expected
    ours = load_model(folder, torch_dtype=torch.float32, spec=UNION_CONTROLNET_SPEC)
    assert isinstance(ours, QwenImageControlNetUnion)
    return reference, ours.eval()


def reference_samples(reference, latents, timestep, text, mask, control, scale):
    with torch.no_grad():
        return reference(
            hidden_states=latents,
            controlnet_cond=control,
            conditioning_scale=scale,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=[[TARGET]] * latents.shape[0],
            return_dict=False,
        )


@pytest.mark.parametrize("lengths", [[10, 4], [7]], ids=["padded-batch", "single"])
def test_union_samples_and_dit_output_match_diffusers(dit5, union_pair, lengths):
    reference_dit, dit = dit5
    reference, ours = union_pair
    latents, timestep, text, mask, control = inputs([TARGET], lengths, ours.config.conditioning_dim)
    expected = reference_samples(reference, latents, timestep, text, mask, control, 0.7)
    with torch.no_grad():
        samples = ours(latents, timestep, text, mask, [TARGET], control, scale=0.7)
    assert len(samples) == len(expected) == 2
    for got, want in zip(samples, expected, strict=True):
        assert want.abs().mean() > 0.1
        assert_matches(got, want)

    with torch.no_grad():
        want = reference_dit(
            latents, text, mask, timestep, img_shapes=[[TARGET]] * len(lengths), controlnet_block_samples=expected
        )[0]
        residual = ours.block_residual(5, latents, timestep, text, mask, [TARGET], control, scale=0.7)
        got = dit(latents, timestep, text, mask, [TARGET], block_residual=residual)
        plain = dit(latents, timestep, text, mask, [TARGET])
    assert_matches(got, want)
    assert (got - plain).abs().max() > 1e-2


def test_several_union_inputs_add_up_as_in_diffusers(dit5, union_pair):
    """diffusers' multi-ControlNet sums one Union's samples over its inputs; summing our residuals is the same."""
    reference_dit, dit = dit5
    reference, ours = union_pair
    latents, timestep, text, mask, control = inputs([TARGET], [10], ours.config.conditioning_dim)
    second = torch.randn_like(control)
    multi = QwenImageMultiControlNetModel([reference])
    with torch.no_grad():
        samples = multi(
            latents,
            [control, second],
            [0.8, 0.4],
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=[[TARGET]],
            return_dict=False,
        )
        want = reference_dit(latents, text, mask, timestep, img_shapes=[[TARGET]], controlnet_block_samples=samples)[0]
        args = (latents, timestep, text, mask, [TARGET])
        residual = sum_block_residuals(
            [ours.block_residual(5, *args, control, 0.8), ours.block_residual(5, *args, second, 0.4)]
        )
        got = dit(*args, block_residual=residual)
    assert_matches(got, want)


def test_sample_residual_spreads_samples_like_diffusers():
    samples = [torch.full((1,), float(k)) for k in range(5)]
    residual = sample_residual(samples, 60)  # the released pair: 60 DiT blocks, 5 Union blocks
    assert [int(residual(i, torch.zeros(1))) for i in range(60)] == [i // 12 for i in range(60)]
    residual = sample_residual(samples[:2], 5)
    assert [int(residual(i, torch.zeros(1))) for i in range(5)] == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="at least one"):
        sample_residual([], 60)


def test_union_rejects_bad_conditioning(union_pair):
    _, ours = union_pair
    latents, timestep, text, mask, control = inputs([TARGET], [10], ours.config.conditioning_dim)
    with pytest.raises(ValueError, match="conditioning must be packed control tokens"):
        ours(latents, timestep, text, mask, [TARGET], control[..., :8])
    with pytest.raises(ValueError, match="at the target's size"):
        ours(latents, timestep, text, mask, [TARGET], control[:, :10])


def test_union_released_layout_matches_diffusers():
    for config, extra in (
        (QwenImageControlNetUnionConfig.union(), 0),
        (QwenImageControlNetUnionConfig.inpainting(), 4),
    ):
        with torch.device("meta"):
            ours = QwenImageControlNetUnion(config)
            theirs = QwenImageControlNetModel(num_layers=5, extra_condition_channels=extra)
        shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
        assert shapes == {key: tuple(value.shape) for key, value in theirs.state_dict().items()}
        assert shapes["controlnet_x_embedder.weight"] == (3072, 64 + extra)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


# ---------------------------------------------------------------------------------------------- blockwise
def diffsynth_keys(num_layers: int) -> set[str]:
    """DiffSynth-Studio's ``QwenImageBlockWiseControlNet`` state dict (``img_in``; per block ``x_rms``, ``y_rms``
    RMSNorm weights and ``input_proj``/``output_proj`` Linears), written out from its module definition."""
    keys = {"img_in.weight", "img_in.bias"}
    for i in range(num_layers):
        keys |= {f"controlnet_blocks.{i}.{name}.weight" for name in ("x_rms", "y_rms", "input_proj", "output_proj")}
        keys |= {f"controlnet_blocks.{i}.{name}.bias" for name in ("input_proj", "output_proj")}
    return keys


@pytest.mark.parametrize(("preset", "in_features"), [("canny", 64), ("depth", 64), ("inpaint", 68)])
def test_blockwise_released_layout(preset, in_features):
    with torch.device("meta"):
        model = QwenImageBlockwiseControlNet(QwenImageBlockwiseControlNetConfig.preset(preset))
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert set(shapes) == diffsynth_keys(60)
    assert shapes["img_in.weight"] == (3072, in_features)
    assert shapes["controlnet_blocks.59.input_proj.weight"] == (3072, 3072)
    assert shapes["controlnet_blocks.0.x_rms.weight"] == (3072,)
    dim = 3072
    count = dim * in_features + dim + 60 * (2 * dim + 2 * (dim * dim + dim))
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.fixture(scope="module", params=["tiny", "tiny-inpaint"])
def blockwise(request, tmp_path_factory) -> QwenImageBlockwiseControlNet:
    """A tiny blockwise ControlNet saved as DiffSynth-Studio's ``model.safetensors`` and loaded by detection."""
    torch.manual_seed(2)
    config = QwenImageBlockwiseControlNetConfig.preset(request.param)
    model = QwenImageBlockwiseControlNet(config)
    randomize(model)
    path = tmp_path_factory.mktemp("qwen_image_blockwise") / "model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)
    (match,) = detect(path, specs=[DIT_SPEC, *CONTROLNET_SPECS])
    assert match.spec is BLOCKWISE_CONTROLNET_SPEC and match.format == "diffsynth" and match.config == config
    loaded = load_model(path, torch_dtype=torch.float32, spec=BLOCKWISE_CONTROLNET_SPEC)
    assert set(loaded.state_dict()) == diffsynth_keys(2)
    return loaded.eval()


@pytest.fixture(scope="module")
def dit2():
    return dit_pair(TINY, seed=3)


def hand_blockwise(state: dict[str, torch.Tensor], index: int, image: torch.Tensor, cond: torch.Tensor):
    """DiffSynth-Studio's ``BlockWiseControlBlock`` math, written out: RMS-normalise both inputs (eps 1e-6, learned
    weight), add, Linear, exact (erf) GELU, Linear."""

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    def linear(x, name):
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    prefix = f"controlnet_blocks.{index}"
    control = linear(cond, "img_in")
    h = rms(image, state[f"{prefix}.x_rms.weight"]) + rms(control, state[f"{prefix}.y_rms.weight"])
    h = linear(h, f"{prefix}.input_proj")
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return linear(h, f"{prefix}.output_proj")


@pytest.mark.parametrize("shapes", [[TARGET], EDIT], ids=["t2i", "edit"])
def test_blockwise_matches_the_hand_written_reference(dit2, blockwise, shapes):
    """After each diffusers block, the target's image tokens get ``scale * block(x, c)`` (a forward hook), as in
    DiffSynth-Studio's model function; our DiT with the ControlNet's ``block_residual`` gives the same output."""
    reference_dit, dit = dit2
    latents, timestep, text, mask, control = inputs(shapes, [10, 6], blockwise.config.conditioning_dim)
    state = {key: value.detach() for key, value in blockwise.state_dict().items()}
    target = math.prod(shapes[0])
    scale = 0.6

    def hook(index):
        def add(module, args, output):
            text_out, image = output
            image = image.clone()
            image[:, :target] = image[:, :target] + scale * hand_blockwise(state, index, image[:, :target], control)
            return text_out, image

        return add

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(reference_dit.transformer_blocks)]
    try:
        with torch.no_grad():
            want = reference_dit(latents, text, mask, timestep, img_shapes=[shapes] * 2, return_dict=False)[0]
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        got = dit(latents, timestep, text, mask, shapes, block_residual=blockwise.block_residual(control, scale))
        plain = dit(latents, timestep, text, mask, shapes)
    assert_matches(got, want)
    assert (got[:, :target] - plain[:, :target]).abs().max() > 1e-2


def test_zero_initialised_blockwise_changes_nothing(dit2, blockwise):
    _, dit = dit2
    fresh = QwenImageBlockwiseControlNet(blockwise.config)
    randomize(fresh)
    fresh.zero_init_()
    latents, timestep, text, mask, control = inputs(EDIT, [10], blockwise.config.conditioning_dim)
    with torch.no_grad():
        plain = dit(latents, timestep, text, mask, EDIT)
        assert torch.equal(
            dit(latents, timestep, text, mask, EDIT, block_residual=fresh.block_residual(control)), plain
        )
        # scale 0 adds nothing either; a trained one does
        residual = blockwise.block_residual(control, 0.0)
        assert torch.equal(dit(latents, timestep, text, mask, EDIT, block_residual=residual), plain)
        changed = dit(latents, timestep, text, mask, EDIT, block_residual=blockwise.block_residual(control))
    assert (changed - plain).abs().max() > 1e-2


def test_blockwise_errors(blockwise):
    latents, timestep, text, mask, control = inputs([TARGET], [10], blockwise.config.conditioning_dim)
    with pytest.raises(ValueError, match="conditioning must be packed control tokens"):
        blockwise.block_residual(control[..., :60])
    deeper = QwenImageDiT(dataclasses.replace(TINY, num_layers=3)).eval()
    with pytest.raises(ValueError, match="one ControlNet block per DiT block"):
        deeper(latents, timestep, text, mask, [TARGET], block_residual=blockwise.block_residual(control))


def test_inpaint_conditioning():
    """17 channels: the latents of the image with the repainted pixels black, then 1 - mask at the latent size
    (nearest), packed into 68 values per token (the mask's 4 last)."""
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    mask = torch.zeros(1, 1, 32, 48)
    mask[..., :16, :24] = 1.0
    masked = mask_control_image(image, mask)
    assert masked[..., :16, :24].eq(-1).all() and torch.equal(masked[..., 16:, :], image[..., 16:, :])
    latents = torch.randn(1, 16, 4, 6)
    conditioning = inpaint_conditioning(latents, mask)
    assert conditioning.shape == (1, 17, 4, 6)
    assert torch.equal(conditioning[:, :16], latents)
    expected = torch.ones(4, 6)
    expected[:2, :3] = 0.0
    assert torch.equal(conditioning[0, 16], expected)
    tokens = pack_latents(conditioning)
    assert tokens.shape == (1, 6, 68)
    assert torch.equal(tokens[0, 0, 64:], torch.zeros(4)) and torch.equal(tokens[0, -1, 64:], torch.ones(4))


def test_sum_block_residuals():
    a = lambda i, x: x * 2  # noqa: E731
    b = lambda i, x: None if i else x  # noqa: E731
    assert sum_block_residuals([]) is None
    assert sum_block_residuals([a]) is a
    total = sum_block_residuals([a, b])
    x = torch.ones(1, 2, 3)
    assert torch.equal(total(0, x), 3 * x) and torch.equal(total(1, x), 2 * x)
    assert sum_block_residuals([b, b])(1, x) is None


def test_config_validation():
    with pytest.raises(ValueError, match="additional_in_dim"):
        QwenImageBlockwiseControlNetConfig(additional_in_dim=-4)
    with pytest.raises(ValueError, match="unknown Qwen-Image blockwise ControlNet preset"):
        QwenImageBlockwiseControlNetConfig.preset("pose")
    with pytest.raises(ValueError, match="axes_dims_rope"):
        QwenImageControlNetUnionConfig(axes_dims_rope=(8, 8, 8))
    assert QwenImageBlockwiseControlNetConfig.preset("inpaint").conditioning_dim == 68
    assert QwenImageControlNetUnionConfig.preset("inpainting").conditioning_dim == 68
