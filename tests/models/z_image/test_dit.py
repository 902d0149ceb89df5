"""ZImageDiT against diffusers' ZImageTransformer2DModel: tiny-size parity and full-size checkpoint layout.

diffusers keeps the official parameter names, so its state dict loads into ours with no conversion. Units: both
take the model's own t in [0, 1] (``1 - sigma``) and multiply by 1000 inside; both return the raw prediction,
which the pipelines negate into the velocity.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import load_file

from ds_loader import load_model
from ds_models_z_image import ZImageDiT, ZImageDiTConfig, caption_groups, padded_length
from ds_models_z_image.dit import sequence_positions

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ZImageDiTConfig.tiny()


def diffusers_kwargs(config: ZImageDiTConfig) -> dict:
    return {
        "all_patch_size": (config.patch_size,),
        "all_f_patch_size": (config.f_patch_size,),
        "in_channels": config.in_channels,
        "dim": config.dim,
        "n_layers": config.n_layers,
        "n_refiner_layers": config.n_refiner_layers,
        "n_heads": config.n_heads,
        "n_kv_heads": config.n_heads,
        "norm_eps": config.norm_eps,
        "qk_norm": True,
        "cap_feat_dim": config.cap_feat_dim,
        "siglip_feat_dim": config.siglip_feat_dim,
        "rope_theta": config.rope_theta,
        "t_scale": config.t_scale,
        "axes_dims": list(config.axes_dims),
        "axes_lens": list(config.axes_lens),
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[ZImageTransformer2DModel, str]:
    """A tiny diffusers model with random weights large enough that every path shows, saved as released."""
    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**diffusers_kwargs(TINY)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0, 0.15)
    folder = tmp_path_factory.mktemp("z_image") / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    return model, str(folder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def ours(reference) -> ZImageDiT:
    _, path = reference
    return load_model(path, torch_dtype=torch.float32).eval()


def assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * expected.abs().max().item())


def _run_reference(model, latents, timestep, text, mask, hints=None) -> torch.Tensor:
    captions = [text[i][mask[i]] for i in range(text.shape[0])]
    with torch.no_grad():
        out = model(
            list(latents.unsqueeze(2).unbind(0)),
            timestep,
            captions,
            return_dict=False,
            controlnet_block_samples=hints,
        )[0]
    return torch.stack(out).squeeze(2)


def _inputs(lengths: list[int], height: int = 12, width: int = 10, total: int = 40):
    b = len(lengths)
    latents = torch.randn(b, TINY.in_channels, height, width)
    timestep = torch.linspace(0.3, 0.85, b)
    text = torch.randn(b, total, TINY.cap_feat_dim)
    mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    return latents, timestep, text, mask


def test_loads_the_diffusers_file_strictly(reference, ours):
    model, path = reference
    assert isinstance(ours, ZImageDiT) and ours.config == TINY
    state = load_file(path)
    assert set(ours.state_dict()) == set(state) == set(model.state_dict())


@pytest.mark.parametrize(
    "lengths",
    [[40, 7], [20, 30], [40, 40], [33]],
    ids=["different-padded-lengths", "one-padded-length", "all-valid", "single"],
)
def test_matches_diffusers(reference, ours, lengths):
    """The batch, and each sample run alone, against diffusers. Tolerances are relative to the output's scale: fp32
    rounding differs with the batch size and with diffusers' masked attention over mixed caption lengths (its own
    batched and single-sample results differ by ~2.5e-5 at outputs of ~20)."""
    model, _ = reference
    latents, timestep, text, mask = _inputs(lengths)
    expected = _run_reference(model, latents, timestep, text, mask)
    with torch.no_grad():
        got = ours(latents, timestep, text, mask)
    assert expected.abs().mean() > 0.1
    assert_matches(got, expected)
    for i in range(len(lengths)):
        alone = _run_reference(model, *(tensor[i : i + 1] for tensor in (latents, timestep, text, mask)))
        assert_matches(got[i : i + 1], alone)


def test_no_mask_means_every_token_is_valid(ours):
    latents, timestep, text, mask = _inputs([40, 40])
    with torch.no_grad():
        torch.testing.assert_close(ours(latents, timestep, text), ours(latents, timestep, text, mask))


def test_each_sample_is_computed_as_if_alone(ours):
    latents, timestep, text, mask = _inputs([40, 7, 25])
    with torch.no_grad():
        batch = ours(latents, timestep, text, mask)
        for i in range(3):
            alone = ours(latents[i : i + 1], timestep[i : i + 1], text[i : i + 1], mask[i : i + 1])
            assert_matches(batch[i : i + 1], alone)


def test_controlnet_hints_match_diffusers(reference, ours):
    model, _ = reference
    latents, timestep, text, mask = _inputs([40, 7])
    image_len = padded_length(6 * 5)
    longest = image_len + max(padded_length(n) for n in (40, 7))
    hints = {0: torch.randn(2, longest, TINY.dim), 1: 0.5 * torch.randn(2, longest, TINY.dim)}
    expected = _run_reference(model, latents, timestep, text, mask, hints)
    with torch.no_grad():
        got = ours(latents, timestep, text, mask, controlnet_hints=hints)
        plain = ours(latents, timestep, text, mask)
    assert_matches(got, expected)
    assert (got - plain).abs().max() > 1e-2


def test_timestep_and_caption_change_the_output(ours):
    latents, timestep, text, mask = _inputs([20])
    with torch.no_grad():
        base = ours(latents, timestep, text, mask)
        assert (ours(latents, timestep + 0.1, text, mask) - base).abs().max() > 1e-2
        moved = text.clone()
        moved[:, 25:] += 1.0  # beyond the valid tokens: ignored
        torch.testing.assert_close(ours(latents, timestep, moved, mask), base)
        tiny = ours(latents + 1e-5, timestep, text, mask)
        torch.testing.assert_close(tiny, base, rtol=1e-3, atol=1e-3)


def test_positions_follow_the_reference():
    positions = sequence_positions(64, (3, 5))
    image, caption = positions[:32], positions[32:]
    assert image[:15, 0].eq(65).all() and image[15:].eq(0).all()
    assert image[:15, 1].tolist() == [r for r in range(3) for _ in range(5)]
    assert image[:15, 2].tolist() == list(range(5)) * 3
    assert caption[:, 0].tolist() == list(range(1, 65)) and caption[:, 1:].eq(0).all()


def test_caption_groups():
    mask = torch.arange(70)[None] < torch.tensor([70, 3, 32, 64])[:, None]
    assert caption_groups(mask, 4, 70) == [([0], 96), ([1, 2], 32), ([3], 64)]
    assert caption_groups(None, 2, 70) == [([0, 1], 96)]


def test_bad_inputs_name_the_argument(ours):
    latents, timestep, text, mask = _inputs([20])
    with pytest.raises(ValueError, match="latents must be"):
        ours(latents[:, :4], timestep, text, mask)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ours(latents[..., :11, :], timestep, text, mask)
    with pytest.raises(ValueError, match="timestep has shape"):
        ours(latents, timestep[None], text, mask)
    with pytest.raises(ValueError, match="text has shape"):
        ours(latents, timestep, text[..., :8], mask)
    with pytest.raises(ValueError, match="text_mask must be"):
        ours(latents, timestep, text, mask.long())
    with pytest.raises(ValueError, match="hint for layer 5"):
        ours(latents, timestep, text, mask, controlnet_hints={5: torch.zeros(1, 96, TINY.dim)})
    with pytest.raises(ValueError, match="covers 10 tokens"):
        ours(latents, timestep, text, mask, controlnet_hints={0: torch.zeros(1, 10, TINY.dim)})


def test_config_validation():
    with pytest.raises(ValueError, match="axes_dims"):
        dataclasses.replace(TINY, axes_dims=(8, 8, 8))
    with pytest.raises(ValueError, match="n_heads"):
        dataclasses.replace(TINY, n_heads=3)
    with pytest.raises(ValueError, match="unknown Z-Image DiT preset"):
        ZImageDiTConfig.preset("turbo-xl")
    assert ZImageDiTConfig.preset("omni_base") == ZImageDiTConfig.preset("omni-base") == ZImageDiTConfig.omni_base()


# ---------------------------------------------------------------------------------------------- full-size layout
@pytest.mark.parametrize("name", ["turbo", "base", "omni-base"])
def test_released_layout_matches_diffusers(name):
    config = ZImageDiTConfig.preset(name)
    with torch.device("meta"):
        ours = ZImageDiT(config)
        theirs = ZImageTransformer2DModel(**diffusers_kwargs(config))
    shapes = {key: tuple(value.shape) for key, value in ours.state_dict().items()}
    assert shapes == {key: tuple(value.shape) for key, value in theirs.state_dict().items()}
    assert shapes["layers.29.attention.norm_q.weight"] == (128,)
    assert shapes["all_x_embedder.2-1.weight"] == (3840, 64)
    assert shapes["layers.0.adaLN_modulation.0.weight"] == (4 * 3840, 256)
    assert shapes["layers.0.feed_forward.w1.weight"] == (10240, 3840)
    assert ("siglip_embedder.1.weight" in shapes) == (name == "omni-base")


def test_turbo_parameter_count():
    with torch.device("meta"):
        count = sum(p.numel() for p in ZImageDiT(ZImageDiTConfig.turbo()).parameters())
    assert count == 6_154_908_736  # the model card's "6B"; 6.15 B from the layer shapes
