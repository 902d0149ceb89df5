"""Shared building blocks of DiffSynth model code: attention dispatch, RoPE, embeddings, norms, patchify, and the
shared pure mechanics of families: flow-matching schedules, VAE tiling and the VAE protocol."""

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
from ds_models_core.schedules import FlowMatchTemplate, flow_match_sigmas, shift_sigmas, stretch_to_terminal
from ds_models_core.tiling import run_tiled
from ds_models_core.vae import VAE

__all__ = [
    "ATTENTION_ENV_VAR",
    "VAE",
    "AttentionBackendError",
    "FlowMatchTemplate",
    "RMSNorm",
    "apply_rope",
    "apply_rope_complex",
    "apply_rope_split",
    "attention",
    "available_attention_implementations",
    "flow_match_sigmas",
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
    "run_tiled",
    "shift_sigmas",
    "split_modulation",
    "stretch_to_terminal",
    "timestep_embedding",
    "unpatchify",
]
