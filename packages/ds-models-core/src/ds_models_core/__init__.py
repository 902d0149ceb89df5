"""Shared building blocks of DiffSynth model code: attention dispatch, RoPE, embeddings, norms, patchify."""

from ds_models_core.attention_dispatch import (
    ATTENTION_ENV_VAR,
    AttentionBackendError,
    attention,
    available_attention_implementations,
)
from ds_models_core.embeddings import timestep_embedding
from ds_models_core.modulation import gated_residual, modulate, split_modulation
from ds_models_core.norms import RMSNorm, rms_norm
from ds_models_core.patchify import patchify, unpatchify
from ds_models_core.rope import (
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

__all__ = [
    "ATTENTION_ENV_VAR",
    "AttentionBackendError",
    "RMSNorm",
    "apply_rope",
    "apply_rope_complex",
    "apply_rope_split",
    "attention",
    "available_attention_implementations",
    "gated_residual",
    "grid_positions",
    "modulate",
    "patchify",
    "rms_norm",
    "rope",
    "rope_angles",
    "rope_complex",
    "rope_split",
    "rotate_half",
    "split_modulation",
    "timestep_embedding",
    "unpatchify",
]
