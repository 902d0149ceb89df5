"""Qwen-Image: the dual-stream MMDiT with the official parameter names, the Qwen2.5-VL text encoder
(transformers), detection specs, presets and the family descriptor. The VAE is the Wan 2.1 VAE, reused from
``ds_models_wan`` (``WanVAE``, the ``"wan.vae"`` spec)."""

__all__: list[str] = []
