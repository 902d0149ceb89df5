"""Qwen-Image's VAE is the Wan 2.1 VAE, reused from ``ds_models_wan`` (not copied).

The released ``vae/`` folder is a diffusers ``AutoencoderKLQwenImage``: the same architecture, key names and
16 latent statistics (``latents_mean``/``latents_std`` in its ``config.json``) as ``AutoencoderKLWan`` at the Wan 2.1
size, so ds-models-wan's ``"wan.vae"`` spec detects and loads it unchanged (its diffusers format), taking the
statistics from that ``config.json``. Qwen-Image runs it on single frames: an image is a one-frame video, and the
latents ``encode`` returns are already normalised, ``(mu - latents_mean) / latents_std``, as diffusers' Qwen-Image
pipelines do by hand around their VAE (``decode`` undoes it). The two helpers here drop the frame axis.
"""

from __future__ import annotations

import torch

from ds_models_wan import WanVAE, WanVAEConfig

__all__ = ["VAE_SPEC_NAME", "WanVAE", "WanVAEConfig", "decode_latents", "encode_image", "qwen_image_vae_config"]

VAE_SPEC_NAME = "wan.vae"  # the ds-models-wan spec that loads Qwen-Image's vae/ folder


def qwen_image_vae_config() -> WanVAEConfig:
    """The released Qwen-Image VAE: the Wan 2.1 VAE (base width 96, z 16, 8x spatial) with its latent statistics."""
    return WanVAEConfig.wan21()


def encode_image(vae: WanVAE, images: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1], in the VAE's dtype and device, to normalised latents (B, 16, H / 8, W / 8).

    H and W must be multiples of 8 (16 for the DiT's 2x2 patches). ``tiled`` bounds memory at high resolution.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"encode_image expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return vae.encode(images.unsqueeze(2), tiled=tiled).squeeze(2)


def decode_latents(vae: WanVAE, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Normalised latents (B, 16, h, w) (as from ``encode_image``) to images (B, 3, 8h, 8w) in [-1, 1]."""
    if latents.ndim != 4:
        raise ValueError(f"decode_latents expects latents of shape (B, 16, h, w), got {tuple(latents.shape)}")
    return vae.decode(latents.unsqueeze(2), tiled=tiled).squeeze(2)
