"""adaLN helpers."""

import pytest
import torch
import torch.nn.functional as F

from ds_models_core import gated_residual, modulate, split_modulation


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_flux_style_block_update():
    x, emb = randn(2, 5, 8), randn(2, 6 * 8, seed=1)  # tokens and a per-sample modulation vector
    shift, scale, gate, *_ = split_modulation(emb[:, None], 6)
    assert shift.shape == (2, 1, 8)
    torch.testing.assert_close(shift, emb[:, None, 0:8])
    torch.testing.assert_close(gate, emb[:, None, 16:24])
    normed = F.layer_norm(x, (8,), eps=1e-6)
    y = modulate(normed, shift, scale)
    torch.testing.assert_close(y, normed * (1 + emb[:, None, 8:16]) + emb[:, None, 0:8])
    torch.testing.assert_close(gated_residual(x, y, gate), x + emb[:, None, 16:24] * y)


def test_scale_only_and_per_token_modulation():
    x, scale = randn(2, 5, 8), randn(2, 5, 8, seed=1)  # Z-Image: no shift; Wan 2.2: per-token
    torch.testing.assert_close(modulate(x, None, scale), x + x * scale)
    torch.testing.assert_close(modulate(x, torch.zeros(8), torch.zeros(8)), x)


def test_split_modulation_rejects_uneven_split():
    with pytest.raises(ValueError, match="into 4 equal parts"):
        split_modulation(torch.zeros(2, 30), 4)
