"""Rotary embeddings against diffusers and transformers, and against the properties RoPE must have."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from transformers.models.llama.modeling_llama import rotate_half as llama_rotate_half

from ds_models_core import (
    apply_rope,
    apply_rope_complex,
    apply_rope_split,
    grid_positions,
    rope,
    rope_angles,
    rope_complex,
    rope_split,
    rotate_half,
)

TIGHT = {"atol": 1e-5, "rtol": 1e-5}


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def flux_ids(text_len=5, h=3, w=4):
    """FLUX.1 position ids: text all zeros, image (0, row, col)."""
    return torch.cat([torch.zeros(text_len, 3), grid_positions((1, h, w))])


def test_flux_rope_matches_diffusers_flux_pos_embed():
    ids = flux_ids()
    x = randn(2, ids.shape[0], 3, 128)  # (batch, seq, heads, head_dim)
    ours = apply_rope(x, rope(ids, (16, 56, 56), theta=10000))
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    theirs = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1, sequence_dim=1)
    torch.testing.assert_close(ours, theirs, **TIGHT)
    assert (ours - x).abs().max() > 0.1  # image positions really rotate


def test_flux_rope_matrix_layout_and_batched_positions():
    ids = flux_ids()
    freqs = rope(ids, (16, 56, 56))
    assert freqs.shape == (ids.shape[0], 64, 2, 2) and freqs.dtype == torch.float32
    angles = rope_angles(ids, (16, 56, 56)).float()
    torch.testing.assert_close(freqs[..., 0, 0], angles.cos())
    torch.testing.assert_close(freqs[..., 0, 1], -angles.sin())
    torch.testing.assert_close(freqs[..., 1, 0], angles.sin())
    # Per-sample ids (batch, seq, 3) broadcast against (batch, seq, heads, head_dim).
    x = randn(2, ids.shape[0], 3, 128)
    batched = rope(torch.stack([ids, ids + 1]), (16, 56, 56))
    out = apply_rope(x, batched)
    torch.testing.assert_close(out[0], apply_rope(x[:1], freqs)[0])
    torch.testing.assert_close(out[1], apply_rope(x[1:], rope(ids + 1, (16, 56, 56)))[0])


def test_apply_rope_keeps_dtype_and_is_accurate_in_bf16():
    ids = flux_ids()
    x = randn(1, ids.shape[0], 2, 128, dtype=torch.bfloat16)
    out = apply_rope(x, rope(ids, (16, 56, 56)))
    assert out.dtype == torch.bfloat16
    ref = apply_rope(x.float(), rope(ids, (16, 56, 56)))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)


def test_complex_rope_matches_diffusers_complex_path():
    pos = torch.arange(12).float()
    freqs = rope_complex(pos, 64, theta=10000, dtype=torch.complex128)
    theirs_freqs = get_1d_rotary_pos_embed(64, pos, theta=10000, use_real=False, freqs_dtype=torch.float64)
    torch.testing.assert_close(freqs, theirs_freqs)
    x = randn(2, 12, 3, 64)
    ours = apply_rope_complex(x, freqs)
    theirs = apply_rotary_emb(x, theirs_freqs[None], use_real=False)  # it wants (batch, seq, dim/2)
    assert ours.dtype == x.dtype
    torch.testing.assert_close(ours, theirs, **TIGHT)


def test_qwen_image_centred_3d_rope_matches_diffusers():
    frames, h, w = 1, 5, 6  # odd height: the centring must take one more negative position
    ours = rope_complex(grid_positions((frames, h, w), centered=(False, True, True)), (16, 56, 56))
    theirs = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)._compute_video_freqs(frames, h, w)
    torch.testing.assert_close(ours, theirs, **TIGHT)


def test_wan_rope_axes_match_diffusers_and_float64_application():
    head_dim, f, h, w = 128, 2, 3, 4
    axes = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    assert axes == (44, 42, 42)
    freqs = rope_complex(grid_positions((f, h, w)), axes, dtype=torch.complex128)
    cos, sin = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=1024)(torch.zeros(1, 16, f, 2 * h, 2 * w))
    torch.testing.assert_close(freqs.real.repeat_interleave(2, -1).float(), cos[0, :, 0], **TIGHT)
    torch.testing.assert_close(freqs.imag.repeat_interleave(2, -1).float(), sin[0, :, 0], **TIGHT)
    # Rotation in float64 (Wan's reference precision), written out with real arithmetic.
    x = randn(1, f * h * w, 2, head_dim, dtype=torch.float64)
    c, s = freqs.real[:, None], freqs.imag[:, None]
    xe, xo = x[..., 0::2], x[..., 1::2]
    expected = torch.stack([xe * c - xo * s, xe * s + xo * c], dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rope_complex(x, freqs), expected, atol=1e-12, rtol=1e-12)


def test_split_rope_matches_diffusers_split_layout():
    pos = torch.arange(9).float()
    cos, sin = rope_split(pos, 32, theta=10000)
    their_cos, their_sin = get_1d_rotary_pos_embed(32, pos, use_real=True, repeat_interleave_real=False)
    torch.testing.assert_close(cos, their_cos)
    torch.testing.assert_close(sin, their_sin)
    x = randn(2, 9, 4, 32)
    ours = apply_rope_split(x, cos, sin)
    theirs = apply_rotary_emb(x, (their_cos, their_sin), use_real=True, use_real_unbind_dim=-2, sequence_dim=1)
    torch.testing.assert_close(ours, theirs, **TIGHT)


def test_rotate_half_matches_transformers():
    x = randn(3, 8)
    torch.testing.assert_close(rotate_half(x), llama_rotate_half(x))


def test_split_and_adjacent_layouts_are_the_same_rotation_on_permuted_channels():
    ids = flux_ids()
    x = randn(1, ids.shape[0], 2, 128)
    adjacent = apply_rope(x, rope(ids, (16, 56, 56)))
    # Split halves pair channel i with i + 64; move adjacent pairs (2i, 2i+1) there and back.
    to_split = torch.cat([torch.arange(0, 128, 2), torch.arange(1, 128, 2)])
    split = apply_rope_split(x[..., to_split], *rope_split(ids, (16, 56, 56)))
    torch.testing.assert_close(split[..., torch.argsort(to_split)], adjacent, **TIGHT)
    torch.testing.assert_close(apply_rope_complex(x, rope_complex(ids, (16, 56, 56))), adjacent, **TIGHT)


@pytest.mark.parametrize("variant", ["real", "complex", "split"])
def test_scores_depend_only_on_relative_position(variant):
    axes, theta = (8, 12, 12), (10000.0, 500.0, 256.0)
    q, k = randn(1, 1, 1, 32, seed=1), randn(1, 1, 1, 32, seed=2)

    def rotate(x, pos):
        pos = torch.tensor([pos], dtype=torch.float32)
        if variant == "real":
            return apply_rope(x, rope(pos, axes, theta))
        if variant == "complex":
            return apply_rope_complex(x, rope_complex(pos, axes, theta))
        return apply_rope_split(x, *rope_split(pos, axes, theta))

    def score(pq, pk):
        return (rotate(q, pq) * rotate(k, pk)).sum()

    torch.testing.assert_close(score([3, 5, 7], [1, 2, 3]), score([12, 13, 14], [10, 10, 10]), **TIGHT)
    torch.testing.assert_close(rotate(q, [3, 5, 7]).norm(), q.norm(), **TIGHT)
    assert (score([3, 5, 7], [1, 2, 3]) - score([3, 5, 7], [1, 2, 4])).abs() > 1e-3


def test_per_axis_theta_and_dims():
    pos = torch.tensor([[2.0, 3.0, -1.5]])
    angles = rope_angles(pos, (4, 6, 2), theta=(10000.0, 2000.0, 256.0))
    assert angles.dtype == torch.float64 and angles.shape == (1, 6)
    expected = [2.0 * 10000.0 ** (-i / 4) for i in (0, 2)]
    expected += [3.0 * 2000.0 ** (-i / 6) for i in (0, 2, 4)]
    expected += [-1.5]
    torch.testing.assert_close(angles[0], torch.tensor(expected, dtype=torch.float64))


def test_rope_argument_errors():
    with pytest.raises(ValueError, match="axes"):
        rope_angles(torch.zeros(4, 2), (16, 56, 56))
    with pytest.raises(ValueError, match="even"):
        rope_angles(torch.zeros(4, 2), (15, 17))
    with pytest.raises(ValueError, match="axes"):
        rope_angles(torch.zeros(4, 2), (16, 16), theta=(1.0, 2.0, 3.0))


def test_grid_positions():
    ids = grid_positions((1, 2, 3), start=(1, 0, 0))
    assert ids.tolist() == [[1, 0, 0], [1, 0, 1], [1, 0, 2], [1, 1, 0], [1, 1, 1], [1, 1, 2]]
    centred = grid_positions((1, 3, 4), centered=(False, True, True)).reshape(3, 4, 3)
    assert centred[:, 0, 1].tolist() == [-2, -1, 0]
    assert centred[0, :, 2].tolist() == [-2, -1, 0, 1]
