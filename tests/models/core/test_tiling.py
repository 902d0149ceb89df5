"""``ds_models_core.tiling``: one tile is exactly the untiled call, and several tiles blend exactly."""

from __future__ import annotations

import pytest
import torch

from ds_models_core.tiling import blend_ramp, check_tiles, run_tiled, tile_spans

TILINGS = (((4, 4), (2, 2)), ((5, 6), (5, 6)), ((6, 7), (1, 2)), ((30, 52), (15, 26)), (4, 2), (5, 5), (6, 1))


@pytest.mark.parametrize("shape", [(1, 2, 13, 21), (1, 2, 3, 13, 21)], ids=["image", "video"])
@pytest.mark.parametrize(("tile", "stride"), TILINGS)
def test_pointwise_functions_tile_exactly(shape, tile, stride):
    """Identity, 8x upsampling (decode-like) and 8x subsampling (encode-like): ramps sum to one, all covered."""
    x = torch.randn(shape)
    torch.testing.assert_close(run_tiled(lambda t: t, x, tile, stride), x, rtol=0, atol=1e-6)
    up = torch.nn.Upsample(scale_factor=(8, 8) if len(shape) == 4 else (1, 8, 8))
    torch.testing.assert_close(run_tiled(up, x, tile, stride, in_scale=1, out_scale=8), up(x))
    torch.testing.assert_close(run_tiled(lambda t: t[..., ::8, ::8], up(x), tile, stride, 8, 1), x)


def test_one_tile_is_the_untiled_call_bit_for_bit():
    """A function that sees the whole input (its mean) is unchanged when a single tile covers everything."""
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    fn = lambda t: torch.tanh(t * t.mean())  # noqa: E731
    assert torch.equal(run_tiled(fn, x, (7, 9), (1, 1)), fn(x))
    assert torch.equal(run_tiled(fn, x, 7, 7), fn(x))
    assert not torch.allclose(run_tiled(fn, x, 3, 2), fn(x))  # several tiles really are separate calls


def test_blend_of_non_pointwise_tiles_is_a_weighted_mean():
    """Where tiles overlap the output is between the tiles' outputs; outside overlaps it is one tile's."""
    x = torch.zeros(1, 1, 1, 10)
    calls = iter(range(100))
    out = run_tiled(lambda t: torch.full_like(t, float(next(calls))), x, (1, 6), (1, 4))  # tiles [0, 6) and [4, 10)
    torch.testing.assert_close(out[0, 0, 0, :4], torch.zeros(4))
    torch.testing.assert_close(out[0, 0, 0, 6:], torch.ones(4))
    torch.testing.assert_close(out[0, 0, 0, 4:6], torch.tensor([0.25, 0.75]))


def test_spans_ramps_and_output_dtype():
    assert tile_spans(5, 8, 4) == [(0, 5, 0, 0)]
    assert tile_spans(10, 4, 3) == [(0, 4, 0, 1), (3, 4, 1, 1), (6, 4, 1, 0)]
    assert tile_spans(10, 4, 4) == [(0, 4, 0, 0), (4, 4, 0, 2), (6, 4, 2, 0)]  # the last tile ends flush
    torch.testing.assert_close(blend_ramp(4, 0, 2)[2:] + blend_ramp(4, 2, 0)[:2], torch.ones(2))  # facing ramps
    assert (blend_ramp(6, 3, 3) > 0).all()
    x = torch.randn(1, 2, 8, 8, dtype=torch.bfloat16)
    assert run_tiled(lambda t: t, x, 3, 2).dtype == torch.bfloat16


def test_errors():
    assert check_tiles(4, (2, 3)) == ((4, 4), (2, 3))
    for size, stride in (((4, 4), (5, 2)), (0, 1), ((4,), (2,)), (4.0, 2), (4, True)):
        with pytest.raises(ValueError, match="positive latent counts with stride <= size"):
            check_tiles(size, stride)
    with pytest.raises(ValueError, match="divisible by 8, got 30x32"):
        run_tiled(lambda t: t, torch.zeros(1, 3, 30, 32), 2, 2, in_scale=8)
