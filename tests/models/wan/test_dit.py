"""The Wan DiT: parity with diffusers' ``WanTransformer3DModel`` on tiny T2V, I2V, FLF2V and TI2V configs, loaded
through ds-loader from a real diffusers folder and from the official layout; the reference's timestep and RoPE
formulas; input guards.

diffusers computes the timestep sinusoid in float32, the reference (and we) in float64; at t ~ 500 that alone moves
the output by ~1e-5 relative. The parity tests therefore give the diffusers model the reference's float64 sinusoid
(``_official_sinusoid``), and ``test_timestep_embedding_is_the_reference_formula`` checks ours against it.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from ds_loader import inspect_checkpoint, load_model
from ds_models_wan import WanDiT, WanDiTConfig
from ds_models_wan.dit import wan_rope_axes

B, FRAMES, HEIGHT, WIDTH = 2, 3, 4, 6  # latent size; 3 x 2 x 3 = 18 tokens
TOKENS = FRAMES * (HEIGHT // 2) * (WIDTH // 2)


def _official_sinusoid(dim: int, t: torch.Tensor) -> torch.Tensor:
    """The reference's ``sinusoidal_embedding_1d``: float64, ``10000 ** (-i / half)``, cos then sin."""
    half = dim // 2
    args = torch.outer(t.double().flatten(), torch.pow(10000.0, -torch.arange(half, dtype=torch.float64) / half))
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def _use_official_sinusoid(model, dim: int) -> None:
    model.condition_embedder.timesteps_proj.forward = lambda t: _official_sinusoid(dim, t).float()


def inputs(config: WanDiTConfig, seed: int = 0) -> dict:
    """Forward arguments for our model; the diffusers call is built from them by ``diffusers_call``."""
    g = torch.Generator().manual_seed(seed)
    args = {
        "latents": torch.randn(B, config.out_dim, FRAMES, HEIGHT, WIDTH, generator=g),
        "timestep": torch.tensor([500.0, 123.25]),
        "context": torch.randn(B, config.text_len, config.text_dim, generator=g),
        "clip_feature": None,
        "condition": None,
    }
    if config.model_type == "ti2v":  # per token, the first frame's tokens pinned at 0 as TI2V-5B does
        args["timestep"] = torch.cat(
            [torch.zeros(B, TOKENS // FRAMES), 900 * torch.rand(B, TOKENS - TOKENS // FRAMES, generator=g)], 1
        )
    if config.condition_dim:
        args["condition"] = torch.randn(B, config.condition_dim, FRAMES, HEIGHT, WIDTH, generator=g)
    if config.has_image_input:
        n = 2 * config.clip_tokens if config.has_image_position_embedding else 5
        args["clip_feature"] = torch.randn(B, n, config.clip_dim, generator=g)
    return args


def diffusers_call(model, config: WanDiTConfig, args: dict) -> torch.Tensor:
    x = args["latents"] if args["condition"] is None else torch.cat([args["latents"], args["condition"]], 1)
    image = args["clip_feature"]
    if image is not None and config.has_image_position_embedding:
        image = image.reshape(2 * B, config.clip_tokens, config.clip_dim)  # diffusers takes (first, last) pairs
    _use_official_sinusoid(model, config.freq_dim)
    with torch.no_grad():
        return model(x, args["timestep"], args["context"], image, return_dict=False)[0]


def assert_parity(ours: torch.Tensor, reference: torch.Tensor) -> None:
    scale = reference.abs().max().item()
    assert scale > 1.0  # the random weights make a clearly non-trivial output
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v", "tiny-flf2v", "tiny-ti2v"])
def test_diffusers_folder_and_official_file_match_diffusers(wan_dit_files, name: str, tmp_path) -> None:
    files = wan_dit_files[name]
    args = inputs(files.config)
    reference = diffusers_call(files.reference, files.config, args)
    from_diffusers = load_model(files.diffusers)
    # Our own state dict, saved as it is, is the official layout: it loads with no conversion.
    ours = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in from_diffusers.state_dict().items()}, ours)
    for path in (files.official, ours):
        (entry,) = inspect_checkpoint(path).entries
        assert entry.format == "official"
    for model in (from_diffusers, load_model(files.official), load_model(ours)):
        assert isinstance(model, WanDiT) and model.config == files.config
        with torch.no_grad():
            assert_parity(model(**args), reference)


def test_flf2v_accepts_the_reference_clip_pairs(wan_dit_files) -> None:
    files = wan_dit_files["tiny-flf2v"]
    model = load_model(files.official)
    args = inputs(files.config)
    pairs = {**args, "clip_feature": args["clip_feature"].reshape(2 * B, files.config.clip_tokens, -1)}
    with torch.no_grad():
        torch.testing.assert_close(model(**pairs), model(**args), rtol=0, atol=0)


def test_parity_is_sensitive_and_stable(wan_dit_files) -> None:
    """A 1e-5 change of the input stays within tolerance; changing the text, the image, the condition or the
    timestep moves the output far beyond it (so the parity above tests every path)."""
    files = wan_dit_files["tiny-i2v"]
    model = load_model(files.official)
    args = inputs(files.config)
    with torch.no_grad():
        base = model(**args)
        nudged = model(**{**args, "latents": args["latents"] + 1e-5})
        assert_parity(nudged, base)
        for key in ("context", "clip_feature", "condition"):
            changed = model(**{**args, key: args[key] + 0.5 * torch.randn_like(args[key])})
            assert (changed - base).abs().max() > 1e-2 * base.abs().max(), key
        later = model(**{**args, "timestep": args["timestep"] + 1.0})
        assert (later - base).abs().max() > 1e-3 * base.abs().max()


def test_per_token_timestep_equals_the_broadcast_one(wan_dit_files) -> None:
    files = wan_dit_files["tiny-ti2v"]
    model = load_model(files.official)
    args = inputs(files.config)
    t = torch.tensor([700.0, 250.0])
    with torch.no_grad():
        per_sample = model(**{**args, "timestep": t})
        per_token = model(**{**args, "timestep": t[:, None].expand(B, TOKENS)})
    assert_parity(per_token, per_sample)  # equal up to float32 rounding of differently batched matmuls


def test_timestep_embedding_is_the_reference_formula() -> None:
    from ds_models_core import timestep_embedding

    t = torch.tensor([0.0, 1.0, 123.25, 999.0])
    torch.testing.assert_close(
        timestep_embedding(t, 256, dtype=torch.float64), _official_sinusoid(256, t), rtol=0, atol=1e-12
    )


def test_rope_split_is_the_reference_one() -> None:
    assert wan_rope_axes(128) == (44, 42, 42)  # the released heads
    assert wan_rope_axes(16) == (8, 4, 4)
    for d in range(6, 200, 2):
        axes = wan_rope_axes(d)
        assert sum(axes) == d and axes[1] == axes[2] == 2 * (d // 6)


def test_text_shorter_than_text_len_is_zero_padded(wan_dit_files) -> None:
    """The reference pads the umT5 features to 512 tokens with zeros before text_embedding."""
    files = wan_dit_files["tiny"]
    model = load_model(files.official)
    args = inputs(files.config)
    args["context"][:, 7:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(**{**args, "context": args["context"][:, :7]}), model(**args))


def test_config_validation_says_what_to_fix() -> None:
    with pytest.raises(ValueError, match="model_type='v2v' must be one of t2v, i2v, flf2v, ti2v"):
        WanDiTConfig(model_type="v2v")
    with pytest.raises(ValueError, match="num_heads=7 times an even head dimension"):
        WanDiTConfig(dim=64, num_heads=7)
    with pytest.raises(ValueError, match="only global attention"):
        WanDiTConfig(window_size=(4, 4))
    with pytest.raises(ValueError, match="needs has_image_input=True"):
        WanDiTConfig(model_type="flf2v", has_image_position_embedding=True)
    with pytest.raises(ValueError, match="unknown Wan DiT preset 'wan3'"):
        WanDiTConfig.preset("wan3")


def test_forward_guards_name_the_argument() -> None:
    torch.manual_seed(0)
    i2v = WanDiT(WanDiTConfig.preset("tiny-i2v")).eval()
    args = inputs(i2v.config)
    with torch.no_grad():
        with pytest.raises(
            ValueError, match=r"takes 36 input channels, got latents 16 \(no condition\); pass condition with 20"
        ):
            i2v(**{**args, "condition": None})
        with pytest.raises(ValueError, match="needs clip_feature"):
            i2v(**{**args, "clip_feature": None})
        with pytest.raises(ValueError, match=r"timestep has shape \(3,\), expected \(2,\) or \(2, 18\)"):
            i2v(**{**args, "timestep": torch.zeros(3)})
        with pytest.raises(ValueError, match="more than text_len=512"):
            i2v(**{**args, "context": torch.zeros(B, 513, 32)})
        with pytest.raises(ValueError, match="not divisible by patch_size"):
            i2v(**{**args, "latents": args["latents"][..., :5], "condition": args["condition"][..., :5]})
        t2v = WanDiT(WanDiTConfig.preset("tiny")).eval()
        with pytest.raises(ValueError, match="has no image input"):
            t2v(**{**inputs(t2v.config), "clip_feature": args["clip_feature"]})


def test_released_sizes() -> None:
    """Parameter counts of the released configs (on meta: no memory), against the published sizes."""
    expected = {
        "wan2.1-t2v-1.3b": 1.42e9,
        "wan2.1-t2v-14b": 14.29e9,
        "wan2.1-i2v-14b": 16.39e9,
        "wan2.2-ti2v-5b": 5.0e9,
    }
    for name, count in expected.items():
        with torch.device("meta"):
            model = WanDiT(WanDiTConfig.preset(name))
        assert math.isclose(sum(p.numel() for p in model.parameters()), count, rel_tol=0.01), name


def test_readme_example_runs(capsys) -> None:
    import re
    from pathlib import Path

    readme = Path(__file__).parents[3] / "packages" / "ds-models-wan" / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.DOTALL)
    assert blocks, "the README should have a python example"
    for block in blocks:
        exec(compile(block, str(readme), "exec"), {})
    assert "torch.Size([1, 16, 3, 4, 6])" in capsys.readouterr().out


def test_low_precision_weights_keep_the_float32_paths(wan_dit_files) -> None:
    """bfloat16 weights (and FP8 storage through ds-vram, no change to the model) run with float32 latents: the
    Linear inputs follow the weights, the modulation and residual stream stay float32, the output is float32."""
    from ds_vram import VRAMConfig, enable_vram_management

    files = wan_dit_files["tiny-i2v"]
    args = inputs(files.config)
    with torch.no_grad():
        reference = load_model(files.official)(**args)
        bf16 = load_model(files.official, torch_dtype=torch.bfloat16)(**args)
        fp8 = load_model(files.official)
        enable_vram_management(
            fp8,
            VRAMConfig(
                storage="cpu",
                storage_dtype=torch.float8_e4m3fn,
                computation_device="cpu",
                computation_dtype=torch.bfloat16,
            ),
        )
        fp8 = fp8(**args)
    for out, bound in ((bf16, 2e-2), (fp8, 5e-2)):
        assert out.dtype == torch.float32
        assert (out - reference).norm() / reference.norm() < bound
