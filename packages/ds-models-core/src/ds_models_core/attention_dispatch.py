"""Scaled dot-product attention behind one layout, with pluggable kernels.

Layout: every tensor is ``(batch, seq, heads, head_dim)`` ("BSHD"), the layout FlashAttention and
SageAttention read natively and the one model code gets from ``Linear -> view(b, s, h, d)`` without a
transpose. Keys and values may have fewer heads than queries (grouped-query attention); query head ``i``
reads key/value head ``i // (heads // kv_heads)``.

Implementations, by name:

* ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``; always available; the only
  one that takes a mask.
* ``"flash_attn_2"``: FlashAttention 2 (package ``flash_attn``).
* ``"flash_attn_3"``: FlashAttention 3 (module ``flash_attn_interface``).
* ``"sage"``: SageAttention (package ``sageattention``).

The choice is, in order: the ``implementation=`` argument, the environment variable
``DIFFSYNTH_ATTENTION_IMPLEMENTATION``, then ``"sdpa"``. A name that is unknown or not installed raises
:class:`AttentionBackendError` naming it and listing what is installed.

When the chosen kernel cannot run a call (a mask, a dtype other than fp16/bf16, a tensor not on CUDA):

* chosen by the ``implementation=`` argument: :class:`AttentionBackendError`, because the caller asked
  for that kernel for this call;
* chosen by the environment variable: the call runs on ``"sdpa"`` and a warning names the reason once,
  because the variable is a process-wide preference and models legitimately mix masked and unmasked
  attention (padded text tokens).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "ATTENTION_ENV_VAR",
    "AttentionBackendError",
    "attention",
    "available_attention_implementations",
]

ATTENTION_ENV_VAR = "DIFFSYNTH_ATTENTION_IMPLEMENTATION"

# Name -> module that must be importable for it to be available (None: part of torch).
_MODULES: dict[str, str | None] = {
    "sdpa": None,
    "flash_attn_2": "flash_attn",
    "flash_attn_3": "flash_attn_interface",
    "sage": "sageattention",
}
# Spellings used elsewhere (DiffSynth upstream, diffusers, package names) for the same kernels.
_ALIASES = {
    "torch": "sdpa",
    "native": "sdpa",
    "flash": "flash_attn_2",
    "flash_attn": "flash_attn_2",
    "flash_attention_2": "flash_attn_2",
    "flash_attention_3": "flash_attn_3",
    "flash_attn_interface": "flash_attn_3",
    "sage_attention": "sage",
    "sageattention": "sage",
}
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class AttentionBackendError(RuntimeError):
    """An attention implementation was asked for that is unknown, not installed, or cannot run the call."""


def _import(name: str):
    module = _MODULES[name]
    if module is None:
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def available_attention_implementations() -> list[str]:
    """Names of the implementations that can be imported in this environment, ``"sdpa"`` first."""
    return [name for name in _MODULES if name == "sdpa" or _import(name) is not None]


def _canonical(name: str, source: str) -> str:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _MODULES:
        raise AttentionBackendError(
            f"Unknown attention implementation {name!r} (from {source}); known: {', '.join(_MODULES)}; "
            f"installed: {', '.join(available_attention_implementations())}."
        )
    if key != "sdpa" and _import(key) is None:
        raise AttentionBackendError(
            f"Attention implementation {name!r} (from {source}) is not installed: cannot import "
            f"{_MODULES[key]!r}; installed: {', '.join(available_attention_implementations())}."
        )
    return key


def _resolve(implementation: str | None) -> tuple[str, bool]:
    """Return (canonical name, chosen explicitly by the caller)."""
    if implementation is not None:
        return _canonical(implementation, "the implementation argument"), True
    from_env = os.environ.get(ATTENTION_ENV_VAR, "").strip()
    if from_env:
        return _canonical(from_env, f"${ATTENTION_ENV_VAR}"), False
    return "sdpa", False


# Head sizes the fused kernels compile for: FlashAttention up to 256 in multiples of 8, SageAttention a few.
_HEAD_DIMS = {"flash_attn_2": range(8, 257, 8), "flash_attn_3": range(8, 257, 8), "sage": (64, 96, 128)}


def _unsupported_reason(name: str, q: torch.Tensor, mask: torch.Tensor | None) -> str | None:
    """Why a FlashAttention/SageAttention kernel cannot run this call, or None when it can."""
    if q.shape[-1] not in _HEAD_DIMS.get(name, (q.shape[-1],)):
        return f"it has no kernel for head_dim {q.shape[-1]}"
    if mask is not None:
        return "it takes no attention mask"
    if q.dtype not in _HALF_DTYPES:
        return f"it needs float16 or bfloat16 inputs, got {q.dtype}"
    if q.device.type != "cuda":
        return f"it needs CUDA tensors, got device {q.device.type!r}"
    return None


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects (batch, seq, heads, head_dim) tensors; got shapes "
            f"q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if k.shape != v.shape[:-1] + k.shape[-1:] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "attention needs k and v with the same batch, seq and heads, and q and k with the same batch "
            f"and head_dim; got q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(b, s, h_kv, d) -> (b, s, h_kv * groups, d), each kv head repeated for its group of query heads."""
    if groups == 1:
        return x
    b, s, h, d = x.shape
    return x[:, :, :, None, :].expand(b, s, h, groups, d).reshape(b, s, h * groups, d)


def _sdpa(q, k, v, mask, scale):
    groups = q.shape[2] // k.shape[2]
    # Repeating kv keeps every SDPA kernel eligible (enable_gqa narrows the choice when a mask is given).
    k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def _flash_attn_2(q, k, v, mask, scale):
    return _import("flash_attn_2").flash_attn_func(q, k, v, softmax_scale=scale)


def _flash_attn_3(q, k, v, mask, scale):
    out = _import("flash_attn_3").flash_attn_func(q, k, v, softmax_scale=scale)
    # Some FlashAttention 3 releases return (out, softmax_lse).
    return out[0] if isinstance(out, tuple) else out


def _sage(q, k, v, mask, scale):
    return _import("sage").sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _sdpa,
    "flash_attn_2": _flash_attn_2,
    "flash_attn_3": _flash_attn_3,
    "sage": _sage,
}


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    implementation: str | None = None,
) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T * scale + mask) v`` in the (batch, seq, heads, head_dim) layout.

    Args:
        q: ``(batch, seq_q, heads, head_dim)``.
        k, v: ``(batch, seq_kv, kv_heads, head_dim)``; ``heads`` must be a multiple of ``kv_heads``.
        mask: broadcastable to ``(batch, heads, seq_q, seq_kv)``. Boolean: True where a query may attend
            (a row with no True gives undefined output). Floating point: added to the scores (0 or -inf
            for padding), cast to the dtype of ``q``. For a key padding mask of shape (batch, seq_kv) pass
            ``mask[:, None, None, :]``.
        scale: softmax scale; default ``head_dim ** -0.5``.
        implementation: ``"sdpa"``, ``"flash_attn_2"``, ``"flash_attn_3"`` or ``"sage"``; overrides the
            environment variable for this call and raises if that kernel cannot run it.

    Returns:
        ``(batch, seq_q, heads, head_dim)`` in the dtype of ``q``.
    """
    _check_shapes(q, k, v)
    name, explicit = _resolve(implementation)
    if name != "sdpa":
        reason = _unsupported_reason(name, q, mask)
        if reason is not None:
            if explicit:
                raise AttentionBackendError(
                    f"Attention implementation {name!r} cannot run this call: {reason}. "
                    "Use implementation='sdpa' for it."
                )
            warnings.warn(
                f"{ATTENTION_ENV_VAR}={name!r}: using 'sdpa' for calls where {name!r} cannot run ({reason}).",
                RuntimeWarning,
                stacklevel=2,
            )
            name = "sdpa"
    return _KERNELS[name](q, k, v, mask, scale)
