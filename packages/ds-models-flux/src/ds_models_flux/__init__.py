"""FLUX.1 models: the DiT and VAE with the parameter names of the official BFL release."""

from ds_models_flux.dit import FluxDiT, FluxDiTConfig
from ds_models_flux.vae import FluxVAE, FluxVAEConfig

__all__ = ["FluxDiT", "FluxDiTConfig", "FluxVAE", "FluxVAEConfig"]
