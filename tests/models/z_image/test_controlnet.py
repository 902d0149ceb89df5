"""ZImageControlNet against diffusers' ZImageControlNetModel (the Fun ControlNet Union 1.0, 2.0 and 2.1 layouts) at a
tiny size, the released 2.1 layout on ``meta``, and detection of the released files.

diffusers keeps the released parameter names, so its ControlNet's own state dict (saved before ``from_transformer``
attaches the DiT's modules) is the layout of the released ``.safetensors``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import ZImageControlNetModel, ZImageTransformer2DModel
from safetensors.torch import load_file, save_file

from ds_loader import DetectionError, detect, load_model
from ds_models_z_image import ZImageDiT, ZImageDiTConfig
from ds_models_z_image.controlnet import (
    CONTROLNET_SPEC,
    ZImageControlHints,
    ZImageControlNet,
    ZImageControlNetConfig,
)
from tests.models.z_image.test_dit import diffusers_kwargs

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_DIT = ZImageDiTConfig.tiny()
# refiner mode -> (diffusers' add_control_noise_refiner, control_in_dim)
MODES = {
    "control_noise_refiner": ("control_noise_refiner", 33),  # 2.1
    "control_layers": ("control_layers", 33),  # 2.0
    "none": (None, 16),  # 1.0
}


def randomize(model: torch.nn.Module) -> None:
    """Weights large enough that every path shows (diffusers zero-initialises the control projections)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.2 * torch.randn_like(parameter))
            else:
                parameter.normal_(0, 0.15)


def our_config(mode: str) -> ZImageControlNetConfig:
    _, channels = MODES[mode]
    return dataclasses.replace(
        ZImageControlNetConfig.tiny(),
        refiner=mode,
        control_in_dim=channels,
        n_refiner_layers=0 if mode == "control_layers" else TINY_DIT.n_refiner_layers,
    )


@pytest.fixture(scope="module")
def dit_pair() -> tuple[ZImageTransformer2DModel, ZImageDiT]:
    torch.manual_seed(0)
    reference = ZImageTransformer2DModel(**diffusers_kwargs(TINY_DIT)).eval()
    randomize(reference)
    ours = ZImageDiT(TINY_DIT)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours.eval()


@pytest.fixture(scope="module", params=list(MODES))
def controlnet_pair(request, dit_pair, tmp_path_factory):
    """(mode, diffusers ControlNet attached to its transformer, ours loaded from the released-layout file)."""
    mode = request.param
    refiner, channels = MODES[mode]
    torch.manual_seed(1)
    reference = ZImageControlNetModel(
        control_layers_places=[0, 1],
        control_refiner_layers_places=[0, 1],
        control_in_dim=channels,
        add_control_noise_refiner=refiner,
        dim=TINY_DIT.dim,
        n_refiner_layers=TINY_DIT.n_refiner_layers,
        n_heads=TINY_DIT.n_heads,
        n_kv_heads=TINY_DIT.n_heads,
        norm_eps=TINY_DIT.norm_eps,
    ).eval()
    randomize(reference)
    path = tmp_path_factory.mktemp("z_image_controlnet") / f"controlnet-{mode}.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    reference = ZImageControlNetModel.from_transformer(reference, dit_pair[0])
    ours = ZImageControlNet(our_config(mode))
    ours.load_state_dict(load_file(path), strict=True)
    return mode, reference, ours.eval(), path


def _inputs(lengths: list[int], channels: int, height: int = 12, width: int = 10, total: int = 40):
    b = len(lengths)
    latents = torch.randn(b, TINY_DIT.in_channels, height, width)
    timestep = torch.linspace(0.3, 0.85, b)
    text = torch.randn(b, total, TINY_DIT.cap_feat_dim)
    mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    control = torch.randn(b, channels, height, width)
    return latents, timestep, text, mask, control


def _reference_hints(reference, latents, timestep, text, mask, control, scale):
    captions = [text[i][mask[i]] for i in range(text.shape[0])]
    with torch.no_grad():
        return reference(
            list(latents.unsqueeze(2).unbind(0)),
            timestep,
            captions,
            list(control.unsqueeze(2).unbind(0)),
            conditioning_scale=scale,
        )


@pytest.mark.parametrize("lengths", [[33], [40, 7]], ids=["single", "mixed-caption-lengths"])
def test_hints_match_diffusers(dit_pair, controlnet_pair, lengths):
    mode, reference, ours, _ = controlnet_pair
    latents, timestep, text, mask, control = _inputs(lengths, ours.config.control_in_dim)
    expected = _reference_hints(reference, latents, timestep, text, mask, control, 0.7)
    with torch.no_grad():
        got = ours(dit_pair[1], latents, timestep, text, mask, control, scale=0.7)
    assert isinstance(got, ZImageControlHints)
    assert sorted(got.layers) == sorted(expected) == [0, 1]
    assert sorted(got.refiner) == ([] if mode == "none" else [0, 1])
    for layer, hint in expected.items():
        assert hint.abs().mean() > 0.05
        # diffusers pads to the batch's longest sequence; past each sample's own length both are ignored
        for i, length in enumerate(lengths):
            size = 32 * -(-(12 // 2) * (10 // 2) // 32) + 32 * -(-length // 32)
            torch.testing.assert_close(
                got.layers[layer][i, :size], hint[i, :size], rtol=1e-5, atol=2e-6 * hint.abs().max().item()
            )


def test_dit_with_hints_matches_diffusers(dit_pair, controlnet_pair):
    """The DiT consumes the main-layer hints as diffusers' transformer consumes ``controlnet_block_samples``."""
    mode, reference, ours, _ = controlnet_pair
    if mode != "none":
        pytest.skip("2.x: see test_refiner_hints_follow_videox_fun")
    latents, timestep, text, mask, control = _inputs([21], ours.config.control_in_dim)
    hints = _reference_hints(reference, latents, timestep, text, mask, control, 1.0)
    with torch.no_grad():
        expected = torch.stack(
            dit_pair[0](
                list(latents.unsqueeze(2).unbind(0)),
                timestep,
                [text[0][mask[0]]],
                return_dict=False,
                controlnet_block_samples=hints,
            )[0]
        ).squeeze(2)
        ours_hints = ours(dit_pair[1], latents, timestep, text, mask, control)
        got = dit_pair[1](latents, timestep, text, mask, controlnet_hints=ours_hints.layers)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * expected.abs().max().item())


def _capture_refiner_hints(reference, mode: str, scale: float) -> tuple[list, object]:
    """Record diffusers' refiner hints: the skips of the first pass through its refiner-stage blocks, scaled."""
    blocks = reference.control_noise_refiner if mode == "control_noise_refiner" else reference.control_layers
    captured: list = []

    def keep(module, args, output):
        if not captured:
            captured.extend(
                hint * scale for hint in output.unbind(0)[:-1][: len(reference.control_refiner_layers_places)]
            )

    return captured, blocks[-1].register_forward_hook(keep)


def test_refiner_hints_follow_videox_fun(dit_pair, controlnet_pair):
    """2.x: the refiner hints go into the DiT's own noise refiner too, as VideoX-Fun's control transformer (and
    DiffSynth-Studio) apply them; diffusers 0.42's transformer drops them. The reference here is diffusers' transformer
    with those hints added after its noise-refiner blocks by hooks."""
    mode, reference, ours, _ = controlnet_pair
    if mode == "none":
        pytest.skip("1.0 has no refiner hints")
    reference_dit, dit = dit_pair
    latents, timestep, text, mask, control = _inputs([21], ours.config.control_in_dim)
    captured, handle = _capture_refiner_hints(reference, mode, 0.8)
    try:
        hints = _reference_hints(reference, latents, timestep, text, mask, control, 0.8)
    finally:
        handle.remove()

    def run_reference(refiner_hints):
        handles = [
            reference_dit.noise_refiner[i].register_forward_hook(lambda m, a, out, hint=hint: out + hint)
            for i, hint in enumerate(refiner_hints)
        ]
        try:
            with torch.no_grad():
                out = reference_dit(
                    list(latents.unsqueeze(2).unbind(0)),
                    timestep,
                    [text[0][mask[0]]],
                    return_dict=False,
                    controlnet_block_samples=hints,
                )[0]
        finally:
            for h in handles:
                h.remove()
        return torch.stack(out).squeeze(2)

    expected = run_reference(captured)
    with torch.no_grad():
        ours_hints = ours(dit, latents, timestep, text, mask, control, scale=0.8)
        got = dit(latents, timestep, text, mask, ours_hints.layers, ours_hints.refiner)
        without = dit(latents, timestep, text, mask, ours_hints.layers)
    assert len(captured) == len(ours_hints.refiner) == 2
    for i, hint in enumerate(captured):
        torch.testing.assert_close(ours_hints.refiner[i], hint, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6 * expected.abs().max().item())
    # diffusers' own pipeline: the same main hints, no refiner hints in the transformer
    torch.testing.assert_close(without, run_reference([]), rtol=1e-5, atol=2e-6 * expected.abs().max().item())
    assert (got - without).abs().max() > 1e-2


def test_scale(dit_pair, controlnet_pair):
    """The scale multiplies every hint; in 2.x the scaled refiner hints also change the image tokens the control
    layers see, so the main hints are not linear in it (as in VideoX-Fun and diffusers)."""
    mode, _, ours, _ = controlnet_pair
    latents, timestep, text, mask, control = _inputs([9], ours.config.control_in_dim)
    with torch.no_grad():
        one = ours(dit_pair[1], latents, timestep, text, mask, control)
        half = ours(dit_pair[1], latents, timestep, text, mask, control, scale=0.5)
    for key in one.refiner:
        torch.testing.assert_close(half.refiner[key], one.refiner[key] * 0.5)
    linear = all(torch.allclose(half.layers[k], one.layers[k] * 0.5, atol=1e-5) for k in one.layers)
    assert linear == (mode == "none")
    total = one + half
    torch.testing.assert_close(total.layers[0], one.layers[0] + half.layers[0])


def test_bad_control_shape_is_named(dit_pair, controlnet_pair):
    _, _, ours, _ = controlnet_pair
    latents, timestep, text, mask, _ = _inputs([9], ours.config.control_in_dim)
    with pytest.raises(ValueError, match=r"control latents have shape \(1, 5, 12, 10\)"):
        ours(dit_pair[1], latents, timestep, text, mask, torch.zeros(1, 5, 12, 10))


def test_config_validation():
    with pytest.raises(ValueError, match=r"ZImageControlNetConfig\.refiner"):
        ZImageControlNetConfig(refiner="both")
    with pytest.raises(ValueError, match="control_layers_places"):
        ZImageControlNetConfig(n_control_layers=2, control_layers_places=(1, 3))
    with pytest.raises(ValueError, match="spread evenly"):
        ZImageControlNetConfig(n_control_layers=4).layer_places(30)
    assert ZImageControlNetConfig(n_control_layers=15).layer_places(30) == tuple(range(0, 30, 2))
    assert ZImageControlNetConfig.union_2_1().layer_places(30) == tuple(range(0, 30, 2))


# ---------------------------------------------------------------------------------------------- released layouts
def _diffusers_meta(config: ZImageControlNetConfig) -> dict[str, tuple[int, ...]]:
    refiner = None if config.refiner == "none" else config.refiner
    with torch.device("meta"):
        model = ZImageControlNetModel(
            control_layers_places=list(config.layer_places(30)),
            control_refiner_layers_places=list(config.control_refiner_layers_places),
            control_in_dim=config.control_in_dim,
            add_control_noise_refiner=refiner,
        )
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("preset", ["union-2.1", "union-2.1-lite", "union-2.0", "union-1.0"])
def test_released_layout_on_meta(preset):
    config = ZImageControlNetConfig.preset(preset)
    with torch.device("meta"):
        ours = ZImageControlNet(config)
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == _diffusers_meta(config)
    if preset == "union-2.1":
        assert got["control_all_x_embedder.2-1.weight"] == (3840, 132)
        assert got["control_layers.0.before_proj.weight"] == (3840, 3840)
        assert "control_layers.1.before_proj.weight" not in got
        assert got["control_noise_refiner.0.adaLN_modulation.0.weight"] == (4 * 3840, 256)
        assert got["control_layers.14.feed_forward.w1.weight"] == (10240, 3840)
        parameters = sum(v.numel() for v in ours.parameters())
        # 15 + 2 Z-Image blocks of ~184M parameters, plus 16 projections of 3840^2: ~3.3B (the 2.1 file is ~6.7 GB
        # in bf16)
        assert 3.2e9 < parameters < 3.4e9


# ---------------------------------------------------------------------------------------------- detection
def test_released_files_are_detected_and_load(controlnet_pair):
    """Each layout saved as released is recognised from its headers, with the refiner stage and input channels,
    and loads strictly through ds_loader."""
    mode, _, ours, path = controlnet_pair
    [match] = detect(path, specs=[CONTROLNET_SPEC])
    assert match.format == "videox-fun"
    assert match.config == dataclasses.replace(ours.config, control_layers_places=None)
    loaded = load_model(path, spec=CONTROLNET_SPEC)
    assert isinstance(loaded, ZImageControlNet) and loaded.config.refiner == mode
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)


def test_released_2_0_file_is_named_by_its_file(controlnet_pair, tmp_path):
    """The released 2.0 file carries 2.1's keys (unused, zero-initialised refiner blocks): its name says 2.0, and
    the refiner blocks are dropped on load."""
    mode, _, _, path = controlnet_pair
    if mode != "control_noise_refiner":
        pytest.skip("the 2.0 release has 2.1's keys")
    renamed = tmp_path / "Z-Image-Turbo-Fun-Controlnet-Union-2.0.safetensors"
    renamed.write_bytes(path.read_bytes())
    [match] = detect(renamed, specs=[CONTROLNET_SPEC])
    assert match.format == "videox-fun-2.0"
    assert (match.config.refiner, match.config.n_refiner_layers) == ("control_layers", 0)
    loaded = load_model(renamed, spec=CONTROLNET_SPEC)
    assert not any(key.startswith("control_noise_refiner.") for key in loaded.state_dict())
    for name in ("Z-Image-Turbo-Fun-Controlnet-Union-2.1-2602-8steps.safetensors", "union-12.0.safetensors"):
        other = tmp_path / name
        other.write_bytes(path.read_bytes())
        assert detect(other, specs=[CONTROLNET_SPEC])[0].config.refiner == "control_noise_refiner"


def test_other_checkpoints_are_not_controlnets(tmp_path):
    path = tmp_path / "dit.safetensors"
    save_file({"all_x_embedder.2-1.weight": torch.zeros(64, 64)}, path)
    with pytest.raises(DetectionError, match="no control_all_x_embedder"):
        detect(path, specs=[CONTROLNET_SPEC])
