"""Every VAE of the installed families satisfies ``ds_models_core.VAE`` at its tiny config, and means it.

The VAEs are found through ds-loader's ``ds.models`` specs (a spec named ``<family>.vae...``), so a new family's
VAE is checked without editing this file.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from ds_loader.detect import registry
from ds_models_core import VAE

VAE_SPECS = sorted(
    (spec for spec in registry.specs() if spec.name.rsplit(".", 1)[-1].startswith("vae")), key=lambda s: s.name
)


def test_the_known_vaes_are_found():
    names = {spec.model_class.__name__ for spec in VAE_SPECS}
    assert {"FluxVAE", "WanVAE", "WanVAE22"} <= names


@pytest.mark.parametrize("spec", VAE_SPECS, ids=lambda spec: spec.name)
def test_vae_satisfies_the_protocol(spec):
    torch.manual_seed(0)
    vae = spec.model_class(spec.config_class.tiny()).eval()
    assert isinstance(vae, VAE)
    for name in ("spatial_compression", "temporal_compression", "latent_channels"):
        value = getattr(vae, name)
        assert isinstance(value, int) and value >= 1, (name, value)
    for method in (vae.encode, vae.decode):
        parameter = inspect.signature(method).parameters.get("tiled")
        assert parameter is not None and parameter.default is False, f"{spec.name}: {method.__name__}(x, tiled=False)"

    s, t, c = vae.spatial_compression, vae.temporal_compression, vae.latent_channels
    if t == 1:
        pixels, latent_shape = torch.rand(1, 3, 2 * s, 3 * s) * 2 - 1, (1, c, 2, 3)
    else:
        pixels, latent_shape = torch.rand(1, 3, t + 1, 2 * s, 3 * s) * 2 - 1, (1, c, 2, 2, 3)
    with torch.no_grad():
        latents = vae.encode(pixels)
        assert latents.shape == latent_shape
        decoded = vae.decode(latents)
        assert decoded.shape == pixels.shape
        # The default tiles are larger than this input: one tile, which is exactly the untiled call.
        assert torch.equal(vae.encode(pixels, tiled=True), latents)
        assert torch.equal(vae.decode(latents, tiled=True), decoded)
