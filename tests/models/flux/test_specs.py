"""FLUX.1 detection specs and lazy recipes on tiny real checkpoints of every layout.

Each layout is loaded through ``ds_loader.load_model`` eagerly and with ds-vram disk storage (lazy: tensors are
read and converted when a layer runs), and must give exactly the outputs of the BFL-file load; diffusers folders
must also match the diffusers model itself.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from ds_loader import AmbiguousModelError, DetectionError, detect, load_model, registry
from ds_models_flux import DIT_SPEC, SPECS, VAE_SPEC, FluxDiT, FluxDiTConfig, FluxVAE, FluxVAEConfig
from ds_models_flux.specs import rope_axes
from ds_vram import VRAMConfig
from tests.models.flux import test_dit

FP8 = torch.float8_e4m3fn
DISK = VRAMConfig(storage="disk", computation_device="cpu", computation_dtype=torch.float32, vram_limit=0)

DIT_LAYOUTS = {  # fixture attribute -> (format, spec to pass or None)
    "dit_bfl": ("bfl", None),
    "dit_sharded": ("bfl", None),
    "dit_comfy": ("comfyui", None),
    "dit_fp8": ("bfl-fp8", None),
    "all_in_one": ("comfyui-fp8", "flux.1.dit"),
}
VAE_LAYOUTS = {
    "vae_bfl": ("bfl", None),
    "vae_fp8": ("bfl-fp8", None),
    "vae_sd": ("sd", None),
    "all_in_one": ("comfyui", "flux.1.vae"),
}


def _fp8_rounded(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(FP8).float() for k, v in state.items()}


@pytest.fixture(scope="module")
def dit_reference(flux_files) -> dict[str, FluxDiT]:
    """Our DiT from the BFL state (and from its FP8-rounded values), built directly."""
    models = {}
    for name, state in (("plain", flux_files.dit_state), ("fp8", _fp8_rounded(flux_files.dit_state))):
        model = FluxDiT(flux_files.dit_config).eval()
        model.load_state_dict(state, strict=True)
        models[name] = model
    return models


@pytest.fixture(scope="module")
def vae_reference(flux_files) -> dict[str, FluxVAE]:
    models = {}
    for name, state in (("plain", flux_files.vae_state), ("fp8", _fp8_rounded(flux_files.vae_state))):
        model = FluxVAE(flux_files.vae_config).eval()
        model.load_state_dict(state, strict=True)
        models[name] = model
    return models


def _dit_out(model: torch.nn.Module, config: FluxDiTConfig) -> torch.Tensor:
    with torch.no_grad():
        return model(**test_dit.make_inputs(config))


def _vae_out(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(1, 3, 16, 16, generator=generator) * 2 - 1
    latents = torch.randn(1, 16, 2, 2, generator=generator)
    with torch.no_grad():
        return model.encode(images), model.decode(latents)


def test_entry_point_registers_the_specs() -> None:
    names = {spec.name for spec in registry.specs()}
    assert {"flux.1.dit", "flux.1.vae", "flux.1.text_encoder_clip", "flux.1.text_encoder_t5"} <= names
    assert all(registry.get(spec.name) is spec for spec in SPECS)


@pytest.mark.parametrize("layout", [*DIT_LAYOUTS, "diffusers"])
def test_dit_detection_infers_the_config(flux_files, layout: str) -> None:
    fmt, _ = DIT_LAYOUTS.get(layout, ("diffusers", None))
    path = flux_files.repo / "transformer" if layout == "diffusers" else getattr(flux_files, layout)
    matches = [m for m in detect(path, specs=SPECS) if m.spec is DIT_SPEC]
    assert [(m.format, m.config) for m in matches] == [(fmt, flux_files.dit_config)]


@pytest.mark.parametrize("mode", ["eager", "disk"])
@pytest.mark.parametrize("layout", [*DIT_LAYOUTS, "diffusers"])
def test_dit_every_layout_gives_the_bfl_outputs(flux_files, dit_reference, layout: str, mode: str) -> None:
    fmt, spec = DIT_LAYOUTS.get(layout, ("diffusers", None))
    path = flux_files.repo / "transformer" if layout == "diffusers" else getattr(flux_files, layout)
    model = load_model(path, spec=spec, vram=DISK if mode == "disk" else None)
    assert isinstance(model, FluxDiT) and model.config == flux_files.dit_config
    if mode == "disk":  # nothing read yet: the weights stay in the file until a layer runs
        assert model.double_blocks[0].img_attn.qkv.weight.is_meta
    else:
        # FP8 files load in bfloat16 (exact for every e4m3fn value) unless torch_dtype says otherwise
        assert model.double_blocks[0].img_attn.qkv.weight.dtype == (torch.bfloat16 if "fp8" in fmt else torch.float32)
    config = flux_files.dit_config
    if layout in ("dit_fp8", "all_in_one"):
        expected = _dit_out(dit_reference["fp8"], config)
        out = _dit_out(model.float() if mode == "eager" else model, config)
    else:
        expected = _dit_out(dit_reference["plain"], config)
        out = _dit_out(model, config)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_dit_diffusers_folder_matches_the_diffusers_model(flux_files) -> None:
    model = load_model(flux_files.repo / "transformer", vram=DISK)
    inputs = test_dit.make_inputs(flux_files.dit_config)
    with torch.no_grad():
        ref = test_dit.run_diffusers(flux_files.transformer, inputs)
        out = model(**inputs)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_fp8_load_casts_per_tensor_to_the_requested_dtype(flux_files, dit_reference) -> None:
    model = load_model(flux_files.dit_fp8, torch_dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    expected = dit_reference["fp8"].state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("layout", [*VAE_LAYOUTS, "diffusers"])
def test_vae_detection_infers_the_config(flux_files, layout: str) -> None:
    fmt, _ = VAE_LAYOUTS.get(layout, ("diffusers", None))
    path = flux_files.repo / "vae" if layout == "diffusers" else getattr(flux_files, layout)
    matches = [m for m in detect(path, specs=SPECS) if m.spec is VAE_SPEC]
    assert [(m.format, m.config) for m in matches] == [(fmt, flux_files.vae_config)]


@pytest.mark.parametrize("mode", ["eager", "disk"])
@pytest.mark.parametrize("layout", [*VAE_LAYOUTS, "diffusers"])
def test_vae_every_layout_gives_the_bfl_outputs(flux_files, vae_reference, layout: str, mode: str) -> None:
    _, spec = VAE_LAYOUTS.get(layout, ("diffusers", None))
    path = flux_files.repo / "vae" if layout == "diffusers" else getattr(flux_files, layout)
    kwargs = {"vram": DISK} if mode == "disk" else {"torch_dtype": torch.float32}
    model = load_model(path, spec=spec, **kwargs)
    assert isinstance(model, FluxVAE) and model.config == flux_files.vae_config
    reference = vae_reference["fp8" if layout == "vae_fp8" else "plain"]
    for out, expected in zip(_vae_out(model), _vae_out(reference), strict=True):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_vae_diffusers_folder_matches_the_diffusers_model(flux_files) -> None:
    model = load_model(flux_files.repo / "vae")
    config = flux_files.vae_config
    latents = torch.randn(1, 16, 4, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = flux_files.autoencoder.decode(latents / config.scale_factor + config.shift_factor).sample
        out = model.decode(latents)
    assert ref.std() > 0.05
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_all_in_one_file_holds_four_models(flux_files) -> None:
    matches = detect(flux_files.all_in_one, specs=SPECS)
    assert sorted((m.spec.name, m.format) for m in matches) == [
        ("flux.1.dit", "comfyui-fp8"),
        ("flux.1.text_encoder_clip", "comfyui"),
        ("flux.1.text_encoder_t5", "comfyui"),
        ("flux.1.vae", "comfyui"),
    ]
    with pytest.raises(AmbiguousModelError, match="several models match"):
        load_model(flux_files.all_in_one)


def test_repository_components_are_each_recognised(flux_files) -> None:
    found = {(m.checkpoint.component, m.spec.name, m.format) for m in detect(flux_files.repo, specs=SPECS)}
    assert found == {
        ("transformer", "flux.1.dit", "diffusers"),
        ("vae", "flux.1.vae", "diffusers"),
        ("text_encoder", "flux.1.text_encoder_clip", "transformers"),
        ("text_encoder_2", "flux.1.text_encoder_t5", "transformers"),
    }


@pytest.mark.parametrize(
    ("changes", "diffusers_kwargs"),
    [
        ({"guidance_embed": False}, {"guidance_embeds": False}),  # schnell
        ({"in_channels": 384}, {"in_channels": 384, "out_channels": 64}),  # fill
        ({"depth": 1, "depth_single_blocks": 3}, {}),
    ],
)
def test_variants_are_inferred_from_shapes(tmp_path, changes: dict, diffusers_kwargs: dict) -> None:
    config = dataclasses.replace(FluxDiTConfig.tiny(), **changes)
    with torch.device("meta"):
        model = FluxDiT(config)
    state = {k: torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "bfl.safetensors")
    assert [(m.format, m.config) for m in detect(tmp_path / "bfl.safetensors", specs=SPECS)] == [("bfl", config)]


def test_full_size_presets_are_inferred_from_meta_shapes(tmp_path) -> None:
    """The released configs, from headers alone (a file of 1-element tensors would not have the real shapes, so
    the detect function reads a view over the meta model's state dict)."""
    from ds_loader import Checkpoint

    for preset in ("dev", "schnell", "fill_dev"):
        with torch.device("meta"):
            model = FluxDiT(FluxDiTConfig.preset(preset))
        checkpoint = Checkpoint(_MetaSource(model.state_dict()), [tmp_path / "flux1.safetensors"])
        assert DIT_SPEC.detect(checkpoint.view()).config == FluxDiTConfig.preset(preset)
    with torch.device("meta"):
        vae = FluxVAE(FluxVAEConfig.flux1())
    checkpoint = Checkpoint(_MetaSource(vae.state_dict()), [tmp_path / "ae.safetensors"])
    assert VAE_SPEC.detect(checkpoint.view()).config == FluxVAEConfig.flux1()


class _MetaSource:
    """A weight source over a meta state dict: real shapes, no data."""

    def __init__(self, state: dict[str, torch.Tensor], path=None):
        self.state = state
        self.path = path

    def keys(self):
        return iter(self.state)

    def __contains__(self, key: object) -> bool:
        return key in self.state

    def info(self, key: str):
        from ds_vram import TensorInfo

        return TensorInfo(self.state[key].dtype, tuple(self.state[key].shape))

    def get(self, key: str) -> torch.Tensor:
        raise AssertionError("detection must not read tensors")


def test_rope_axes() -> None:
    assert rope_axes(128) == (16, 56, 56) and rope_axes(32) == (8, 12, 12)
    for head_dim in (64, 96, 256):
        axes = rope_axes(head_dim)
        assert sum(axes) == head_dim and all(a % 2 == 0 and a > 0 for a in axes)


def test_other_checkpoints_are_not_recognised(tmp_path) -> None:
    wan = {  # Wan 2.1 DiT and VAE key names
        "patch_embedding.weight": torch.zeros(8, 16, 1, 2, 2),
        "text_embedding.0.weight": torch.zeros(8, 16),
        "time_embedding.0.weight": torch.zeros(8, 4),
        "blocks.0.self_attn.q.weight": torch.zeros(8, 8),
        "head.head.weight": torch.zeros(4, 8),
        "encoder.conv1.weight": torch.zeros(4, 3, 3, 3, 3),
        "decoder.conv1.weight": torch.zeros(4, 4, 3, 3, 3),
    }
    save_file(wan, tmp_path / "wan.safetensors")
    save_file({"weight": torch.randn(3, 3), "something.else": torch.randn(2)}, tmp_path / "random.safetensors")
    for name in ("wan", "random"):
        with pytest.raises(DetectionError, match=rf"no model spec recognises .*{name}\.safetensors.*closest"):
            detect(tmp_path / f"{name}.safetensors", specs=SPECS)


def test_sd_vae_and_scaled_fp8_are_refused_with_a_reason(flux_files, tmp_path) -> None:
    sd_vae = {**flux_files.vae_state, "quant_conv.weight": torch.zeros(32, 32, 1, 1)}
    save_file(sd_vae, tmp_path / "sd-vae.safetensors")
    with pytest.raises(DetectionError, match="quant_conv: a Stable Diffusion style VAE"):
        load_model(tmp_path / "sd-vae.safetensors", spec=VAE_SPEC)
    scaled = {**flux_files.dit_state, "img_in.scale_weight": torch.ones(1), "scaled_fp8": torch.zeros(0)}
    save_file(scaled, tmp_path / "scaled.safetensors")
    with pytest.raises(DetectionError, match="scaled FP8"):
        load_model(tmp_path / "scaled.safetensors", spec=DIT_SPEC)


def _planned(spec, source: _MetaSource) -> tuple[object, dict[str, tuple[int, ...]]]:
    """Detect on headers, then plan the format's recipe: the config and the converted keys with their shapes."""
    from ds_loader import Checkpoint

    checkpoint = Checkpoint(source, [source.path])
    detection = spec.detect(checkpoint.view())
    recipe = spec.recipe(detection.format)
    weights = checkpoint if recipe is None else recipe.apply(checkpoint)
    return detection, {k: tuple(weights.info(k).shape) for k in weights.keys()}  # noqa: SIM118


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_official_layouts_map_onto_our_models(tmp_path) -> None:
    """Released sizes on meta: diffusers' transformer and VAE, CLIP-L and T5-XXL in their files' key names, through
    detection and the lazy recipes, give exactly our models' keys and shapes."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ds_models_flux import CLIP_SPEC, T5_SPEC
    from tests.models.flux import test_vae

    with torch.device("meta"):
        theirs = FluxTransformer2DModel(guidance_embeds=True)
        autoencoder = AutoencoderKL(**test_vae.diffusers_config(FluxVAEConfig.flux1()))
        ours, vae = FluxDiT(FluxDiTConfig.dev()), FluxVAE(FluxVAEConfig.flux1())
    detection, planned = _planned(DIT_SPEC, _MetaSource(theirs.state_dict(), tmp_path / "transformer" / "x"))
    assert (detection.format, detection.config, planned) == ("diffusers", FluxDiTConfig.dev(), _shapes(ours))
    detection, planned = _planned(VAE_SPEC, _MetaSource(autoencoder.state_dict(), tmp_path / "vae" / "x"))
    assert (detection.format, detection.config, planned) == ("diffusers", FluxVAEConfig.flux1(), _shapes(vae))

    clip_l = CLIPTextConfig(  # CLIP-L's text model, as FLUX's text_encoder/config.json
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12, hidden_act="quick_gelu"
    )
    t5_xxl = T5Config(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        clip, t5 = CLIPTextModel(clip_l), T5EncoderModel(t5_xxl)
    # The released files: CLIP keys under "text_model.", T5 with shared.weight only (the tied copy not saved).
    clip_file = {("" if k.startswith("text_model.") else "text_model.") + k: v for k, v in clip.state_dict().items()}
    t5_file = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    detection, planned = _planned(CLIP_SPEC, _MetaSource(clip_file, tmp_path / "text_encoder" / "x"))
    assert planned == _shapes(clip)
    assert (detection.config.num_attention_heads, detection.config.num_hidden_layers) == (12, 12)
    detection, planned = _planned(T5_SPEC, _MetaSource(t5_file, tmp_path / "text_encoder_2" / "x"))
    assert planned == _shapes(t5)
    config = detection.config
    assert (config.num_heads, config.d_kv, config.d_ff, config.num_layers, config.vocab_size) == (
        64,
        64,
        10240,
        24,
        32128,
    )


def test_vae_with_legacy_diffusers_attention_names(flux_files, vae_reference, tmp_path) -> None:
    """Older diffusers VAE files name the mid-block attention query/key/value/proj_attn."""
    from safetensors.torch import load_file

    state = load_file(flux_files.repo / "vae" / "diffusion_pytorch_model.safetensors")
    legacy = {}
    for key, value in state.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = value
    save_file(legacy, tmp_path / "legacy-vae.safetensors")
    model = load_model(tmp_path / "legacy-vae.safetensors", spec=VAE_SPEC)
    for out, expected in zip(_vae_out(model), _vae_out(vae_reference["plain"]), strict=True):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
