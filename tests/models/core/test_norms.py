"""RMSNorm against torch's rms_norm, diffusers' RMSNorm and a float64 reference."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm as DiffusersRMSNorm

from ds_models_core import RMSNorm, rms_norm


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference64(x, weight, eps):
    """Normalise in float64, round to the input dtype, then apply the weight in that dtype."""
    xd = x.double()
    out = (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out if weight is None else out * weight.to(x.dtype)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_float32_matches_torch_rms_norm(affine, eps):
    x = randn(2, 7, 64) * 3
    weight = randn(64, seed=1) if affine else None
    torch.testing.assert_close(rms_norm(x, weight, eps), F.rms_norm(x, (64,), weight, eps), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("affine", [True, False])
def test_half_precision_matches_float64_reference(dtype, affine):
    x = (randn(4, 9, 32) * 5).to(dtype)
    weight = randn(32, seed=1).to(dtype) if affine else None
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out.float(), reference64(x, weight, 1e-6).float(), atol=tol, rtol=tol)


def test_module_matches_diffusers_rms_norm_in_bf16():
    x = randn(2, 5, 48).bfloat16()
    ours = RMSNorm(48, eps=1e-6).bfloat16()
    theirs = DiffusersRMSNorm(48, eps=1e-6, elementwise_affine=True).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(randn(48, seed=3))
        theirs.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)


def test_statistics_are_computed_in_float32():
    # 300**2 overflows float16 (max 65504): a norm computed in float16 would return zeros or NaN.
    x = torch.full((1, 8), 300.0, dtype=torch.float16)
    out = rms_norm(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), torch.ones(1, 8), atol=1e-3, rtol=1e-3)


def test_module_parameters_and_eps():
    affine, plain = RMSNorm(16), RMSNorm(16, eps=1e-6, elementwise_affine=False)
    assert list(affine.state_dict()) == ["weight"] and affine.weight.shape == (16,)
    assert list(plain.state_dict()) == [] and plain.weight is None
    x = randn(3, 16) * 1e-3  # mean square 1e-6: eps is not negligible
    loose = RMSNorm(16, eps=1e-2, elementwise_affine=False)
    assert (plain(x) - loose(x)).abs().max() > 0.5
    assert "eps=1e-06" in repr(plain)


def test_rms_norm_parameter_name_follows_the_checkpoint():
    from ds_models_core import RMSNorm

    norm = RMSNorm(8, parameter_name="scale")
    assert list(dict(norm.named_parameters())) == ["scale"]
    with torch.no_grad():
        norm.scale.mul_(3)
    x = torch.randn(2, 8)
    torch.testing.assert_close(norm(x), RMSNorm(8)(x) * 3)
