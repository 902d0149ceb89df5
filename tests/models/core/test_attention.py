"""attention(): SDPA against a plain softmax reference, backend selection, errors and fallbacks."""

import sys
import types

import pytest
import torch

import ds_models_core.attention_dispatch as attention_module
from ds_models_core import (
    ATTENTION_ENV_VAR,
    AttentionBackendError,
    attention,
    available_attention_implementations,
)

# bf16 keeps 8 bits of mantissa: outputs of softmax-weighted means of O(1) values are good to ~1e-2.
TOLERANCES = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def reference_attention(q, k, v, mask=None, scale=None):
    """Plain softmax attention in float64, (batch, seq, heads, head_dim), kv head = q head // groups."""
    q, k, v = (t.double() for t in (q, k, v))
    groups = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask.double()
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)


def make_qkv(batch=2, seq_q=7, seq_kv=7, heads=4, kv_heads=4, head_dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_q, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, seq_kv, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, seq_kv, kv_heads, head_dim, generator=g).to(dtype)
    return q, k, v


@pytest.fixture(autouse=True)
def _no_env_override(monkeypatch):
    monkeypatch.delenv(ATTENTION_ENV_VAR, raising=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("seq_q", "seq_kv", "heads", "kv_heads"),
    [(7, 7, 4, 4), (5, 9, 4, 4), (7, 7, 4, 2), (6, 11, 8, 1)],
    ids=["self", "cross", "gqa2", "mqa"],
)
def test_sdpa_matches_softmax_reference(dtype, seq_q, seq_kv, heads, kv_heads):
    q, k, v = make_qkv(seq_q=seq_q, seq_kv=seq_kv, heads=heads, kv_heads=kv_heads, dtype=dtype)
    out = attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_boolean_mask(dtype):
    q, k, v = make_qkv(seq_q=6, seq_kv=10, heads=4, kv_heads=2, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(2, 4, 6, 10, generator=g) > 0.5
    mask[..., 0] = True  # every query keeps at least one key
    out = attention(q, k, v, mask)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), **TOLERANCES[dtype])
    # The mask must matter: without it the result is different.
    assert (out.double() - reference_attention(q, k, v)).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_mask(dtype):
    q, k, v = make_qkv(seq_q=6, seq_kv=10, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    bias = torch.randn(1, 4, 6, 10, generator=g)
    out = attention(q, k, v, bias)
    # Reference with the bias as it is rounded to the inputs' dtype.
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, bias.to(dtype)), **TOLERANCES[dtype])
    assert (out.double() - reference_attention(q, k, v)).abs().max() > 0.1


def test_key_padding_mask_ignores_padded_keys():
    q, k, v = make_qkv(batch=2, seq_kv=8)
    lengths = torch.tensor([8, 5])
    keep = torch.arange(8)[None, :] < lengths[:, None]  # (batch, seq_kv)
    out = attention(q, k, v, keep[:, None, None, :])
    # Sample 1 attends only to its first 5 keys, so it equals attention over the truncated sequence.
    torch.testing.assert_close(out[1:], attention(q[1:], k[1:, :5], v[1:, :5]), atol=1e-5, rtol=1e-5)
    additive = torch.zeros(2, 8).masked_fill(~keep, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, additive[:, None, None, :]), out, atol=1e-6, rtol=1e-6)


def test_scale_argument():
    q, k, v = make_qkv()
    out = attention(q, k, v, scale=0.5)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, scale=0.5), atol=1e-5, rtol=1e-5)
    assert (out - attention(q, k, v)).abs().max() > 1e-2


def test_gqa_maps_query_heads_to_consecutive_groups():
    # 4 query heads, 2 kv heads: heads 0,1 read kv head 0 and heads 2,3 read kv head 1 (not 0,2 / 1,3).
    q, k, v = make_qkv(heads=4, kv_heads=2)
    out = attention(q, k, v)
    for head, kv_head in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        single = attention(q[:, :, head : head + 1], k[:, :, kv_head : kv_head + 1], v[:, :, kv_head : kv_head + 1])
        torch.testing.assert_close(out[:, :, head : head + 1], single, atol=1e-6, rtol=1e-6)


def test_bad_shapes_raise():
    q, k, v = make_qkv(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention(q, k, v)
    q, k, v = make_qkv()
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        attention(q[0], k[0], v[0])


def test_sdpa_is_always_available():
    names = available_attention_implementations()
    assert names[0] == "sdpa"
    assert set(names) <= {"sdpa", "flash_attn_2", "flash_attn_3", "sage"}


def test_unknown_implementation_is_an_error_naming_it():
    q, k, v = make_qkv()
    with pytest.raises(AttentionBackendError, match=r"'no_such_kernel'.*installed: sdpa"):
        attention(q, k, v, implementation="no_such_kernel")


@pytest.mark.parametrize(("name", "module"), [("flash_attn_3", "flash_attn_interface"), ("sage", "sageattention")])
def test_uninstalled_implementation_is_an_error_naming_it(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    q, k, v = make_qkv()
    with pytest.raises(AttentionBackendError, match=rf"'{name}'.*not installed.*'{module}'.*installed: sdpa"):
        attention(q, k, v, implementation=name)
    assert name not in available_attention_implementations()


def test_env_override_is_honoured(monkeypatch):
    q, k, v = make_qkv()
    monkeypatch.setenv(ATTENTION_ENV_VAR, "bogus_kernel")
    with pytest.raises(AttentionBackendError, match=rf"'bogus_kernel'.*{ATTENTION_ENV_VAR}"):
        attention(q, k, v)
    # The argument wins over the environment.
    ref = reference_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v, implementation="sdpa").double(), ref, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv(ATTENTION_ENV_VAR, "torch")  # an alias of sdpa
    torch.testing.assert_close(attention(q, k, v).double(), ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def fake_flash_attn(monkeypatch):
    """A stand-in `flash_attn` package whose kernel is the reference, recording what it was given."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None):
        calls.append({"shapes": (q.shape, k.shape, v.shape), "scale": softmax_scale})
        return reference_attention(q, k, v, scale=softmax_scale).to(q.dtype)

    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    return calls


def test_installed_kernel_receives_bshd_and_gqa_unchanged(monkeypatch, fake_flash_attn):
    # Pretend the device and dtype suit the kernel; masks still do not.
    reason = lambda _name, q, mask: None if mask is None else "mask"  # noqa: E731
    monkeypatch.setattr(attention_module, "_unsupported_reason", reason)
    assert "flash_attn_2" in available_attention_implementations()
    q, k, v = make_qkv(heads=4, kv_heads=2)
    out = attention(q, k, v, scale=0.3, implementation="flash_attn_2")
    assert fake_flash_attn == [{"shapes": (q.shape, k.shape, v.shape), "scale": 0.3}]
    torch.testing.assert_close(out, attention(q, k, v, scale=0.3), atol=1e-6, rtol=1e-6)


def test_explicit_kernel_that_cannot_run_the_call_raises(fake_flash_attn):
    q, k, v = make_qkv()  # float32 on CPU: FlashAttention cannot run it
    with pytest.raises(AttentionBackendError, match=r"'flash_attn_2' cannot run this call.*float16 or bfloat16"):
        attention(q, k, v, implementation="flash_attn_2")
    with pytest.raises(AttentionBackendError, match="mask"):
        attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), torch.ones(7, 7, dtype=torch.bool), implementation="flash")
    assert fake_flash_attn == []


def test_kernels_refuse_head_sizes_they_have_no_kernel_for(fake_flash_attn):
    # The FLUX.1 VAE's mid-block attention has one head of 512: no FlashAttention kernel exists for it.
    q, k, v = make_qkv(head_dim=512)
    with pytest.raises(AttentionBackendError, match="no kernel for head_dim 512"):
        attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), implementation="flash_attn_2")
    assert attention_module._unsupported_reason("sage", q.bfloat16(), None).startswith("it has no kernel for head")


def test_env_kernel_that_cannot_run_the_call_falls_back_to_sdpa_with_a_warning(monkeypatch, fake_flash_attn):
    monkeypatch.setenv(ATTENTION_ENV_VAR, "flash_attn_2")
    q, k, v = make_qkv()
    mask = torch.rand(1, 1, 7, 7) > 0.3
    mask[..., 0] = True
    with pytest.warns(RuntimeWarning, match="flash_attn_2.*sdpa.*mask"):
        out = attention(q, k, v, mask)
    assert fake_flash_attn == []
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", available_attention_implementations())
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_installed_backends_on_cuda(name, kv_heads):
    q, k, v = (t.cuda() for t in make_qkv(seq_q=64, seq_kv=80, heads=4, kv_heads=kv_heads, head_dim=64))
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = attention(q, k, v, implementation=name)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    # SageAttention quantises q and k to int8: allow it a looser bound.
    tol = 5e-2 if name == "sage" else 2e-2
    torch.testing.assert_close(out.double().cpu(), reference_attention(q, k, v).cpu(), atol=tol, rtol=tol)
