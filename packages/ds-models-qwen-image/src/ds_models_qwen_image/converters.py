"""Lazy recipes from the Qwen-Image checkpoint layouts we read into our models' key names.

Every target tensor is a rename of one source tensor (ds-loader ``Recipe``), evaluated per tensor when asked for,
so ds-vram disk storage streams converted checkpoints too.

Text encoder (our ``Qwen2_5_VLModel`` has ``language_model.*`` and ``visual.*``, no LM head):

- ``transformers``: ``Qwen2_5_VLForConditionalGeneration`` as transformers >= 4.52 lays it out
  (``model.language_model.*``, ``model.visual.*``, ``lm_head.weight``);
- ``transformers-legacy``: the same model as older transformers saved it, which is how the released
  ``Qwen/Qwen-Image*/text_encoder/`` shards are named (``model.*`` for the language model, ``visual.*``,
  ``lm_head.weight``); DiffSynth-Studio converts it the same way (``model.`` -> ``model.language_model.``,
  ``visual.`` -> ``model.visual.``);
- ``qwen2_5_vl-model``: a bare ``Qwen2_5_VLModel`` (``language_model.*``, ``visual.*``): no conversion.

``lm_head.weight`` is dropped in every layout: the DiT reads hidden states only.

The DiT's released layout needs no conversion (see ``dit_specs``); the VAE is ds-models-wan's.
"""

from __future__ import annotations

from ds_loader import Recipe, drop, strip_prefix

__all__ = ["TEXT_ENCODER_FORMATS", "text_encoder_recipe"]

TEXT_ENCODER_FORMATS = ("transformers", "transformers-legacy", "qwen2_5_vl-model")


def text_encoder_recipe(fmt: str) -> Recipe:
    """The recipe of one text-encoder layout (one of ``TEXT_ENCODER_FORMATS``) into ``Qwen2_5_VLModel`` names."""
    head = drop(r"lm_head\.weight")
    if fmt == "transformers":
        return Recipe(head, strip_prefix("model."))
    if fmt == "transformers-legacy":
        return Recipe(head, strip_prefix("model.", "language_model."))  # visual.* is already ours
    if fmt == "qwen2_5_vl-model":
        return Recipe(head)
    raise ValueError(f"unknown Qwen-Image text encoder format {fmt!r}; choose one of {TEXT_ENCODER_FORMATS}")
