"""What a LoRA file holds, from its header: key format, ranks, alphas, target modules and metadata.

Reads the file through ``read_lora``: shapes, ``__metadata__``, alphas (``.alpha`` tensors, or the peft config
diffusers and peft store with the file), and every tensor checked for NaN and infinity. Pickled files
(``.pt``/``.bin``) go only through ``ds_loader``'s ``load_pickle`` (``weights_only=True``).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ds_vram import read_safetensors_header

from .lora import KOHYA_PREFIX, parse_lora, read_lora
from .lora_io import guess_lora_family

__all__ = ["LoraInfo", "inspect_lora", "lora_key_format"]

_BLOCK_INDEX = re.compile(r"(?<=[._])\d+(?=[._]|$)")


@dataclass(frozen=True)
class LoraInfo:
    """A LoRA file described.

    format: ``"kohya"`` (``lora_unet_a_b`` names with lora_down/up), ``"comfyui"`` (``diffusion_model.`` names
    with lora_down/up), ``"diffusers"`` (``transformer.`` names with lora_A/B), ``"peft"`` (``base_model.model.``),
    ``"diffsynth"`` (the model's own names with lora_A/B) or ``"unknown"``. ranks/alphas: counts of each value
    over the adapted modules, as the loader applies them (from ``.alpha`` tensors or the file's
    ``lora_adapter_metadata``/``adapter_config.json``; None: not stored, the loader uses alpha = rank).
    targets: the distinct module names with block indices replaced by ``*``, with how many modules each covers.
    family: the model family the layer names belong to (``"flux.1"``, ``"wan"``), None when they do not tell.
    """

    path: str
    format: str
    modules: int
    parameters: int
    ranks: dict[int, int]
    alphas: dict[float | None, int]
    targets: dict[str, int]
    metadata: dict[str, str] = field(default_factory=dict)
    unknown_keys: tuple[str, ...] = ()
    family: str | None = None

    def __str__(self) -> str:
        def counts(values: dict) -> str:
            return ", ".join(
                f"{value} ({count})" if len(values) > 1 else str(value) for value, count in values.items()
            )

        lines = [
            self.path,
            f"  format      {self.format}",
            f"  family      {self.family or '-'}",
            f"  modules     {self.modules} ({self.parameters:,} parameters)",
            f"  rank        {counts(self.ranks) or '-'}",
            f"  alpha       {counts(self.alphas) or '-'}",
            "  targets",
        ]
        width = max((len(t) for t in self.targets), default=0)
        lines += [f"    {target:<{width}}  x{count}" for target, count in self.targets.items()]
        if self.unknown_keys:
            lines.append(f"  unrecognised keys ({len(self.unknown_keys)}): {', '.join(self.unknown_keys[:5])}")
        if self.metadata:
            lines.append("  metadata")
            width = max(len(k) for k in self.metadata)
            for key, value in sorted(self.metadata.items()):
                shown = value if len(value) <= 80 else value[:77] + "..."
                lines.append(f"    {key:<{width}}  {shown}")
        return "\n".join(lines)


def lora_key_format(keys: list[str]) -> str:
    """The trainer convention a LoRA state dict's key names follow (see ``LoraInfo.format``)."""
    adapter_keys = [k for k in keys if ".lora_" in k or k.endswith(".alpha")]
    if not adapter_keys:
        return "unknown"
    down_up = any(".lora_down." in k for k in adapter_keys)
    if down_up and all(k.startswith(KOHYA_PREFIX) for k in adapter_keys):
        return "kohya"
    if down_up:
        return (
            "comfyui" if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys) else "kohya"
        )
    if any(k.startswith("base_model.model.") for k in adapter_keys):
        return "peft"
    if any(k.startswith("transformer.") for k in adapter_keys):
        return "diffusers"
    return "diffsynth"


def inspect_lora(path: str | os.PathLike) -> LoraInfo:
    """Describe a LoRA file; raises FileNotFoundError/ValueError naming the file when it is not one."""
    path = Path(path)
    state = read_lora(path)
    metadata = read_safetensors_header(path)[1] if path.suffix == ".safetensors" else {}
    pieces, unknown = parse_lora(state)
    if not pieces:
        sample = ", ".join(list(state)[:3]) or "no tensors"
        raise ValueError(f"{path}: no LoRA down/up pairs found (first keys: {sample})")
    ranks = Counter(piece.down.shape[0] for piece in pieces.values())
    alphas = Counter(piece.alpha for piece in pieces.values())
    targets = Counter(_BLOCK_INDEX.sub("*", name) for name in pieces)
    parameters = sum(piece.down.numel() + piece.up.numel() for piece in pieces.values())
    try:
        family = guess_lora_family(pieces)
    except ValueError:  # names of neither family (or of both): reported as unknown, not an error of inspection
        family = None
    return LoraInfo(
        str(path),
        lora_key_format(list(state)),
        len(pieces),
        parameters,
        dict(sorted(ranks.items())),
        dict(alphas.most_common()),
        dict(sorted(targets.items())),
        dict(metadata or {}),
        tuple(unknown),
        family,
    )
