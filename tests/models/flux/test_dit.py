"""FluxDiT against diffusers' FluxTransformer2DModel: tiny-size parity and full-size checkpoint layout.

Parity: a diffusers model with random weights is converted to the BFL layout here (``diffusers_to_bfl``, the
inverse of diffusers' single-file converter), loaded strictly into ours, and both run on the same inputs.
Units: both take timesteps in [0, 1] and the raw guidance scale and multiply by 1000 inside, and both
official pipelines (BFL ``denoise``, diffusers ``FluxPipeline``: ``timestep / 1000``) pass them that way.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

from ds_models_core import grid_positions
from ds_models_flux import FluxDiT, FluxDiTConfig

TINY = FluxDiTConfig.tiny()
# name -> (our config, diffusers kwargs) at tiny size
VARIANTS = {
    "dev": (TINY, {"guidance_embeds": True}),
    "schnell": (dataclasses.replace(TINY, guidance_embed=False), {"guidance_embeds": False}),
    "fill": (
        dataclasses.replace(TINY, in_channels=384),
        {"guidance_embeds": True, "in_channels": 384, "out_channels": 64},
    ),
}


def diffusers_kwargs(config: FluxDiTConfig) -> dict:
    return {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim,
        "pooled_projection_dim": config.vec_in_dim,
        "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": config.axes_dim,
    }


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    first, second = w.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in the BFL ``flux1-dev.safetensors`` layout."""
    sd = dict(state)
    out: dict[str, torch.Tensor] = {}

    def move(src: str, dst: str) -> None:
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd.pop(f"{src}.{p}")

    def fuse(srcs: list[str], dst: str) -> None:
        for p in ("weight", "bias"):
            out[f"{dst}.{p}"] = torch.cat([sd.pop(f"{s}.{p}") for s in srcs], dim=0)

    move("x_embedder", "img_in")
    move("context_embedder", "txt_in")
    for src, dst in (
        ("timestep_embedder", "time_in"),
        ("text_embedder", "vector_in"),
        ("guidance_embedder", "guidance_in"),
    ):
        move(f"time_text_embed.{src}.linear_1", f"{dst}.in_layer")
        move(f"time_text_embed.{src}.linear_2", f"{dst}.out_layer")
    move("proj_out", "final_layer.linear")
    # diffusers' AdaLayerNormContinuous gives (scale, shift); BFL's final layer (shift, scale)
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap_halves(sd.pop(f"norm_out.linear.{p}"))

    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for i in range(n_double):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        move(f"{s}.norm1.linear", f"{d}.img_mod.lin")
        move(f"{s}.norm1_context.linear", f"{d}.txt_mod.lin")
        fuse([f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"], f"{d}.img_attn.qkv")
        fuse([f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"], f"{d}.txt_attn.qkv")
        for norm, stream, which in (
            ("norm_q", "img", "query"),
            ("norm_k", "img", "key"),
            ("norm_added_q", "txt", "query"),
            ("norm_added_k", "txt", "key"),
        ):
            out[f"{d}.{stream}_attn.norm.{which}_norm.scale"] = sd.pop(f"{s}.attn.{norm}.weight")
        move(f"{s}.attn.to_out.0", f"{d}.img_attn.proj")
        move(f"{s}.attn.to_add_out", f"{d}.txt_attn.proj")
        move(f"{s}.ff.net.0.proj", f"{d}.img_mlp.0")
        move(f"{s}.ff.net.2", f"{d}.img_mlp.2")
        move(f"{s}.ff_context.net.0.proj", f"{d}.txt_mlp.0")
        move(f"{s}.ff_context.net.2", f"{d}.txt_mlp.2")

    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_single):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        move(f"{s}.norm.linear", f"{d}.modulation.lin")
        fuse([f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"], f"{d}.linear1")
        move(f"{s}.proj_out", f"{d}.linear2")
        out[f"{d}.norm.query_norm.scale"] = sd.pop(f"{s}.attn.norm_q.weight")
        out[f"{d}.norm.key_norm.scale"] = sd.pop(f"{s}.attn.norm_k.weight")
    assert not sd, f"diffusers keys left unmapped: {sorted(sd)}"
    return out


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights with enough spread that every path matters: norm scales away from 1, biases away from 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / p.shape[1] ** 0.5)
            elif "norm" in name:  # RMS norm scales
                p.copy_(1 + 0.3 * noise)
            else:
                p.copy_(0.2 * noise)


def make_inputs(config: FluxDiTConfig, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two samples, a 3x5 patch grid (not square, so a row/column mix-up shows) and 6 text tokens."""
    g = torch.Generator().manual_seed(seed)
    b, s = 2, 6
    img_ids = grid_positions((1, 3, 5)).expand(b, -1, -1)
    inputs = {
        "img": torch.randn(b, img_ids.shape[1], config.in_channels, generator=g),
        "img_ids": img_ids,
        "txt": torch.randn(b, s, config.context_in_dim, generator=g),
        "txt_ids": torch.zeros(b, s, 3),
        "timesteps": torch.tensor([0.3, 0.85]),
        "y": torch.randn(b, config.vec_in_dim, generator=g),
    }
    if config.guidance_embed:
        inputs["guidance"] = torch.tensor([3.5, 1.5])
    return inputs


def run_diffusers(model: FluxTransformer2DModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        hidden_states=inputs["img"],
        encoder_hidden_states=inputs["txt"],
        pooled_projections=inputs["y"],
        timestep=inputs["timesteps"],
        img_ids=inputs["img_ids"][0],  # diffusers takes one (L, 3) id grid for the batch
        txt_ids=inputs["txt_ids"][0],
        guidance=inputs.get("guidance"),
        return_dict=False,
    )[0]


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def pair() -> tuple[FluxDiT, FluxTransformer2DModel]:
    """Tiny dev-style models with the same random weights: ours loaded from the diffusers weights."""
    theirs = FluxTransformer2DModel(**diffusers_kwargs(TINY)).eval()
    randomize(theirs)
    ours = FluxDiT(TINY).eval()
    ours.load_state_dict(diffusers_to_bfl(theirs.state_dict()), strict=True)
    return ours, theirs


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_with_diffusers(variant: str) -> None:
    config, kwargs = VARIANTS[variant]
    theirs = FluxTransformer2DModel(**{**diffusers_kwargs(config), **kwargs}).eval()
    randomize(theirs, seed=3)
    ours = FluxDiT(config).eval()
    ours.load_state_dict(diffusers_to_bfl(theirs.state_dict()), strict=True)
    inputs = make_inputs(config)
    with torch.no_grad():
        out, ref = ours(**inputs), run_diffusers(theirs, inputs)
    assert out.shape == (2, 15, config.out_channels)
    assert ref.abs().max() > 0.5  # not a degenerate output
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_parity_is_sensitive(pair: tuple[FluxDiT, FluxTransformer2DModel]) -> None:
    """What a wrong timestep unit, RoPE axis order or modulation order would do is far above the tolerance."""
    ours, theirs = pair
    inputs = make_inputs(TINY)
    with torch.no_grad():
        ref = run_diffusers(theirs, inputs)
        torch.testing.assert_close(ours(**inputs), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        assert max_rel(ours(**{**inputs, "timesteps": inputs["timesteps"] * 1000}), ref) > 1e-2
        assert max_rel(ours(**{**inputs, "guidance": inputs["guidance"] + 0.5}), ref) > 1e-2
        assert max_rel(ours(**{**inputs, "img_ids": inputs["img_ids"][..., [0, 2, 1]]}), ref) > 1e-2
        # a 1e-5 change of the input stays near 1e-5
        nudged = {**inputs, "img": inputs["img"] + 1e-5 * torch.randn_like(inputs["img"])}
        assert max_rel(ours(**nudged), ref) < 1e-3


@pytest.mark.parametrize(
    "key",
    [
        "final_layer.adaLN_modulation.1.weight",  # swapped (shift, scale) halves
        "double_blocks.0.txt_attn.norm.key_norm.scale",
        "double_blocks.1.img_mod.lin.bias",
        "single_blocks.1.linear1.weight",
        "vector_in.in_layer.weight",
        "guidance_in.out_layer.bias",
    ],
)
def test_each_weight_matters(pair: tuple[FluxDiT, FluxTransformer2DModel], key: str) -> None:
    ours, _ = pair
    inputs = make_inputs(TINY)
    changed = copy.deepcopy(ours)
    weight = changed.get_parameter(key)
    with torch.no_grad():
        weight.copy_(_swap_halves(weight) if "adaLN" in key else weight * 1.1)
    with torch.no_grad():
        assert max_rel(changed(**inputs), ours(**inputs)) > 1e-3


def test_kontext_reference_tokens_equal_concatenation(pair: tuple[FluxDiT, FluxTransformer2DModel]) -> None:
    ours, theirs = pair
    inputs = make_inputs(TINY)
    g = torch.Generator().manual_seed(5)
    ref_tokens = torch.randn(2, 4, TINY.in_channels, generator=g)
    ref_ids = grid_positions((1, 2, 2), start=(1, 0, 0)).expand(2, -1, -1)
    joined = {
        **inputs,
        "img": torch.cat((inputs["img"], ref_tokens), dim=1),
        "img_ids": torch.cat((inputs["img_ids"], ref_ids), dim=1),
    }
    with torch.no_grad():
        out = ours(**inputs, ref_tokens=ref_tokens, ref_ids=ref_ids)
        full = ours(**joined)
        ref = run_diffusers(theirs, joined)
        plain = ours(**inputs)
    assert out.shape == (*inputs["img"].shape[:2], TINY.out_channels)
    torch.testing.assert_close(out, full[:, :15], rtol=0, atol=0)
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert max_rel(out, plain) > 1e-3  # the reference image is seen


def test_bfloat16_runs_close_to_float32(pair: tuple[FluxDiT, FluxTransformer2DModel]) -> None:
    ours, _ = pair
    inputs = make_inputs(TINY)
    half = FluxDiT(TINY).to(torch.bfloat16).eval()
    half.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ref = ours(**inputs)
        out = half(**{k: v.to(torch.bfloat16) if k in ("img", "txt", "y") else v for k, v in inputs.items()})
    assert out.dtype == torch.bfloat16
    assert max_rel(out.float(), ref) < 0.1


@pytest.mark.parametrize(
    ("preset", "kwargs"),
    [
        ("dev", {"guidance_embeds": True}),
        ("schnell", {"guidance_embeds": False}),
        ("fill_dev", {"guidance_embeds": True, "in_channels": 384, "out_channels": 64}),
    ],
)
def test_full_size_layout_matches_diffusers_converter(preset: str, kwargs: dict) -> None:
    """Our keys are the BFL file's: diffusers' single-file converter maps them onto its model exactly."""
    with torch.device("meta"):
        ours = FluxDiT(FluxDiTConfig.preset(preset))
        theirs = FluxTransformer2DModel(**kwargs)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(ours.state_dict()))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    # the inverse used by the parity tests gives back exactly our layout
    assert {k: tuple(v.shape) for k, v in diffusers_to_bfl(theirs.state_dict()).items()} == shapes
    n_params = sum(v.numel() for v in ours.state_dict().values())
    assert n_params == sum(v.numel() for v in theirs.state_dict().values())


def test_presets() -> None:
    dev = FluxDiTConfig.dev()
    assert (dev.hidden_size, dev.num_heads, dev.depth, dev.depth_single_blocks, dev.head_dim) == (
        3072,
        24,
        19,
        38,
        128,
    )
    assert FluxDiTConfig.krea_dev() == FluxDiTConfig.kontext_dev() == dev
    assert not FluxDiTConfig.schnell().guidance_embed
    assert (FluxDiTConfig.fill_dev().in_channels, FluxDiTConfig.fill_dev().out_channels) == (384, 64)
    assert all(FluxDiTConfig.preset(name) == getattr(FluxDiTConfig, name)() for name in FluxDiTConfig.PRESETS)
    with pytest.raises(ValueError, match=r"unknown FLUX\.1 DiT preset 'pro'; choose one of dev, schnell"):
        FluxDiTConfig.preset("pro")
    with torch.device("meta"):
        assert FluxDiT(FluxDiTConfig.schnell()).guidance_in is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden_size": 65}, "hidden_size=65 is not divisible by num_heads=2"),
        ({"axes_dim": (8, 12, 10)}, r"axes_dim=\(8, 12, 10\) must be positive even numbers summing to .* = 32"),
        ({"axes_dim": (9, 11, 12)}, "must be positive even numbers"),
        ({"depth": -1}, "depth=-1 must be an integer >= 0"),
        ({"num_heads": 0}, "num_heads=0 must be a positive integer"),
        ({"mlp_ratio": 0.0}, "mlp_ratio=0.0 must be positive"),
    ],
)
def test_config_errors_say_what_to_fix(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY, **changes)


def test_forward_errors(pair: tuple[FluxDiT, FluxTransformer2DModel]) -> None:
    ours, _ = pair
    inputs = make_inputs(TINY)
    with pytest.raises(ValueError, match=r"guidance-distilled .* pass guidance"):
        ours(**{**inputs, "guidance": None})
    with pytest.raises(ValueError, match=r"img has shape \(2, 15, 60\), expected \(2, 15, 64\)"):
        ours(**{**inputs, "img": inputs["img"][..., :60]})
    with pytest.raises(ValueError, match="img and txt must be"):
        ours(**{**inputs, "img": torch.randn(2, 16, 4, 4)})
    with pytest.raises(ValueError, match="both ref_tokens and ref_ids"):
        ours(**inputs, ref_tokens=inputs["img"])
    with pytest.raises(ValueError, match=r"ref_ids has shape \(2, 15, 2\), expected \(2, 15, 3\)"):
        ours(**inputs, ref_tokens=inputs["img"], ref_ids=inputs["img_ids"][..., :2])


def test_vram_never_fp8_patterns_name_real_layers() -> None:
    with torch.device("meta"):
        model = FluxDiT(FluxDiTConfig.dev())
    layers = [name for name, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    for pattern in FluxDiT.ds_vram_never_fp8:
        assert any(fnmatch.fnmatchcase(name, pattern) for name in layers), pattern
    kept = [name for name in layers if any(fnmatch.fnmatchcase(name, p) for p in FluxDiT.ds_vram_never_fp8)]
    assert not any(name.startswith(("double_blocks", "single_blocks")) for name in kept)
    kept_params = sum(p.numel() for name in kept for p in model.get_submodule(name).parameters(recurse=False))
    assert kept_params / sum(p.numel() for p in model.parameters()) < 0.01


def test_meta_build_and_assign_load(pair: tuple[FluxDiT, FluxTransformer2DModel]) -> None:
    """The way the loader builds a released size: on meta, then ``load_state_dict(assign=True)``."""
    ours, _ = pair
    with torch.device("meta"):
        model = FluxDiT(TINY)
    model.load_state_dict(ours.state_dict(), strict=True, assign=True)
    inputs = make_inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs), ours(**inputs), rtol=0, atol=0)


def test_fp8_storage_under_ds_vram_keeps_declared_layers(pair: tuple[FluxDiT, FluxTransformer2DModel]) -> None:
    from ds_vram import VRAMConfig, enable_vram_management

    ours, _ = pair
    inputs = make_inputs(TINY)
    with torch.no_grad():
        ref = ours(**inputs)
    model = copy.deepcopy(ours)
    config = VRAMConfig(storage="cpu", storage_dtype="fp8", computation_device="cpu", computation_dtype=torch.float32)
    handle = enable_vram_management(model, config)
    dtypes = {layer.name: layer.dtype for layer in handle.report().layers}
    assert dtypes["img_in"] == dtypes["time_in.in_layer"] == dtypes["final_layer.adaLN_modulation.1"] == "float32"
    assert dtypes["double_blocks.0.img_attn.qkv"] == dtypes["single_blocks.1.linear1"] == "float8_e4m3fn"
    with torch.no_grad():
        out = model(**inputs)
    assert 0 < max_rel(out, ref) < 0.2
