"""The few names every VAE shares, so a pipeline or training adapter can treat any family's VAE alike."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["VAE"]


@runtime_checkable
class VAE(Protocol):
    """An autoencoder between pixels in [-1, 1] and the latents its DiT reads.

    Shapes (images have no time axis; ``temporal_compression`` is then 1):
        pixels  ``(B, 3, H, W)`` or ``(B, 3, F, H, W)``
        latents ``(B, latent_channels, H / s, W / s)`` or ``(B, latent_channels, (F - 1) / t + 1, H / s, W / s)``
    with ``s = spatial_compression`` and ``t = temporal_compression`` (a causal first frame: ``F = t * k + 1``).
    Latents are normalised as the family's DiT expects them (scale/shift or per-channel statistics applied).

    ``tiled=True`` encodes or decodes overlapping spatial tiles one at a time (``ds_models_core.tiling``), which
    bounds memory at high resolution and changes the result slightly near seams; each VAE documents its tile
    keywords (sizes always in latents). ``isinstance(vae, VAE)`` checks that the names exist, not their types.
    """

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent along each side."""
        ...

    @property
    def temporal_compression(self) -> int:
        """Video frames per latent frame (after the first); 1 for image VAEs."""
        ...

    @property
    def latent_channels(self) -> int:
        """Channels of the latents."""
        ...

    def encode(self, pixels: torch.Tensor, tiled: bool = False, **kwargs: Any) -> torch.Tensor:
        """Pixels in [-1, 1] to normalised latents."""
        ...

    def decode(self, latents: torch.Tensor, tiled: bool = False, **kwargs: Any) -> torch.Tensor:
        """Normalised latents to pixels, roughly in [-1, 1]."""
        ...
