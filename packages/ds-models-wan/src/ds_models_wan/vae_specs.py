"""Detection specs and lazy recipes for the Wan 2.1 and 2.2 VAEs ("wan.vae", "wan.vae22").

Formats:
- ``official``: ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` (pickles, read through ``torch.load(weights_only=True)``;
  a ``model_state``/``state_dict`` wrapper is unwrapped by ds-loader), their safetensors copies, and the ComfyUI
  repacks (``wan_2.1_vae.safetensors``, ``wan2.2_vae.safetensors``), which keep the official names. No conversion.
- ``diffusers``: an ``AutoencoderKLWan`` folder (``vae/``); renamed lazily, key by key.

Detection reads key names and shapes only and infers the config (widths, depth, which levels halve time); the
latent statistics come from the diffusers ``config.json`` when present, else from the release with that ``z_dim``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec, Recipe, rule
from ds_loader.recipes import Key, KeyInfo
from ds_models_wan.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, WanVAE, WanVAEConfig
from ds_models_wan.vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WanVAE22, WanVAE22Config

__all__ = [
    "VAE21_SPEC",
    "VAE22_SPEC",
    "VAE_SPECS",
    "detect_vae21",
    "detect_vae22",
    "diffusers_to_official",
    "diffusers_vae_recipe",
]

KNOWN_STATS = {16: (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), 48: (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}

# --- diffusers AutoencoderKLWan -> official names ---------------------------------------------------------------

_RESNET = {"norm1.gamma": "residual.0.gamma", "norm2.gamma": "residual.3.gamma"}
_RESNET_PREFIX = {"conv1.": "residual.2.", "conv2.": "residual.6.", "conv_shortcut.": "shortcut."}
_FIXED = {
    "quant_conv.": "conv1.",
    "post_quant_conv.": "conv2.",
    "encoder.conv_in.": "encoder.conv1.",
    "decoder.conv_in.": "decoder.conv1.",
    "encoder.norm_out.gamma": "encoder.head.0.gamma",
    "decoder.norm_out.gamma": "decoder.head.0.gamma",
    "encoder.conv_out.": "encoder.head.2.",
    "decoder.conv_out.": "decoder.head.2.",
}


def _resnet(rest: str) -> str:
    if rest in _RESNET:
        return _RESNET[rest]
    for theirs, ours in _RESNET_PREFIX.items():
        if rest.startswith(theirs):
            return ours + rest[len(theirs) :]
    return rest


def _count(has: Callable[[str], bool], prefix: str) -> int:
    n = 0
    while has(f"{prefix}{n}.norm1.gamma"):
        n += 1
    return n


def diffusers_to_official(key: str, has: Callable[[str], bool]) -> str:
    """The official name of a diffusers ``AutoencoderKLWan`` key (2.1 or 2.2 layout); ``has`` tells whether a
    diffusers key exists (the flat official indices depend on how many residual blocks a level has)."""
    for theirs, ours in _FIXED.items():
        if key == theirs or (theirs.endswith(".") and key.startswith(theirs)):
            return ours + key[len(theirs) :]
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, kind, i, rest = m.groups()
        index = 1 if kind == "attentions" else 2 * int(i)
        return f"{part}.middle.{index}.{rest if kind == 'attentions' else _resnet(rest)}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)\.|downsampler\.)?(.+)", key)
    if m:
        level, inner, j, rest = m.groups()
        if inner is None:  # 2.1: down_blocks is the flat official list
            return f"encoder.downsamples.{level}.{_resnet(rest)}"
        if j is not None:
            return f"encoder.downsamples.{level}.downsamples.{j}.{_resnet(rest)}"
        blocks = _count(has, f"encoder.down_blocks.{level}.resnets.")
        return f"encoder.downsamples.{level}.downsamples.{blocks}.{rest}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(?:resnets\.(\d+)\.|upsampler\.|upsamplers\.0\.)(.+)", key)
    if m:
        level, j, rest = m.groups()
        blocks = _count(has, f"decoder.up_blocks.{level}.resnets.")
        if _is_residual(has):  # 2.2: one nested list per level, blocks then the upsampler
            inner = f"{j}.{_resnet(rest)}" if j is not None else f"{blocks}.{rest}"
            return f"decoder.upsamples.{level}.upsamples.{inner}"
        # 2.1: one flat list; every level before this one has `blocks` residual blocks and an upsampler
        start = int(level) * (blocks + 1)
        return (
            f"decoder.upsamples.{start + int(j)}.{_resnet(rest)}"
            if j is not None
            else (f"decoder.upsamples.{start + blocks}.{rest}")
        )
    return key


def _is_residual(has: Callable[[str], bool]) -> bool:
    """2.2's residual levels have ``encoder.down_blocks.0.resnets.0``; 2.1's flat list has ``down_blocks.0.norm1``."""
    return has("encoder.down_blocks.0.resnets.0.norm1.gamma")


def diffusers_vae_recipe() -> Recipe:
    """Lazy renames from an ``AutoencoderKLWan`` state dict (2.1 or 2.2) to the official names."""

    def fn(match: re.Match[str], keys: KeyInfo) -> dict[str, Any]:
        return {diffusers_to_official(match.string, keys.__contains__): Key(match.string)}

    return Recipe(rule(r"(encoder|decoder|quant_conv|post_quant_conv)\..*", fn))


class _OfficialNames:
    """A diffusers header view seen under the official names (for config inference)."""

    def __init__(self, view: HeaderView) -> None:
        has = view.__contains__
        self._view = view
        self._map = {diffusers_to_official(k, has): k for k in view}

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def shape(self, key: str) -> tuple[int, ...]:
        return self._view.shape(self._map[key])

    def count_blocks(self, prefix: str) -> int:
        found = {int(k[len(prefix) :].split(".", 1)[0]) for k in self._map if k.startswith(prefix)}
        return max(found) + 1 if found else 0


# --- detection --------------------------------------------------------------------------------------------------

_CORE = ("encoder.conv1.weight", "decoder.conv1.weight", "conv1.weight", "conv2.weight", "decoder.head.2.weight")


def _layout(view: HeaderView) -> tuple[Any, str] | Mismatch:
    if all(k in view for k in _CORE):
        return view, "official"
    if "encoder.conv_in.weight" in view and "post_quant_conv.weight" in view and "quant_conv.weight" in view:
        if "encoder.norm_out.gamma" not in view:
            return Mismatch("diffusers VAE keys without RMS-norm gammas: not AutoencoderKLWan", 0.5)
        return _OfficialNames(view), "diffusers"
    closeness = sum(k.startswith(("encoder.downsamples.", "decoder.upsamples.")) for k in view) / max(len(view), 1)
    return Mismatch(
        "no encoder.conv1/decoder.conv1/conv1/conv2 (official Wan VAE) or AutoencoderKLWan keys", closeness
    )


def _stats(view: HeaderView, z_dim: int) -> dict[str, tuple[float, ...]] | str:
    json = view.config_json or {}
    mean, std = json.get("latents_mean"), json.get("latents_std")
    if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == z_dim:
        return {"latents_mean": tuple(map(float, mean)), "latents_std": tuple(map(float, std))}
    if z_dim not in KNOWN_STATS:
        return f"z_dim {z_dim} has no known latent statistics (16: Wan 2.1, 48: Wan 2.2) and no config.json gives them"
    mean, std = KNOWN_STATS[z_dim]
    return {"latents_mean": mean, "latents_std": std}


def detect_vae21(view: HeaderView) -> Detection | Mismatch:
    """The Wan 2.1 VAE (3 input channels, flat ``encoder.downsamples``), official or diffusers layout."""
    found = _layout(view)
    if isinstance(found, Mismatch):
        return found
    names, fmt = found
    conv1 = names.shape("encoder.conv1.weight")
    if len(conv1) != 5 or conv1[1] != 3:
        return Mismatch(f"encoder.conv1 has shape {conv1}: not the 2.1 VAE's 3-channel 3D conv", 0.7)
    if "encoder.downsamples.0.residual.0.gamma" not in names:
        return Mismatch("encoder.downsamples.0 is not a residual block (the 2.2 VAE nests them)", 0.7)
    dim, z_dim = conv1[0], names.shape("conv2.weight")[0]
    n = names.count_blocks("encoder.downsamples.")
    resamples = [k for k in range(n) if f"encoder.downsamples.{k}.resample.1.weight" in names]
    blocks = resamples[0] if resamples else n
    levels = len(resamples) + 1
    if n != levels * blocks + len(resamples) or names.count_blocks("decoder.upsamples.") != levels * (blocks + 2) - 1:
        return Mismatch("encoder.downsamples / decoder.upsamples counts do not fit the 2.1 level structure", 0.6)
    stats = _stats(view, z_dim)
    if isinstance(stats, str):
        return Mismatch(stats, 0.6)
    config = WanVAEConfig(
        dim=dim,
        z_dim=z_dim,
        dim_mult=tuple(
            names.shape(f"encoder.downsamples.{i * (blocks + 1)}.residual.2.weight")[0] // dim for i in range(levels)
        ),
        num_res_blocks=blocks,
        temperal_downsample=tuple(f"encoder.downsamples.{k}.time_conv.weight" in names for k in resamples),
        **stats,
    )
    return Detection(fmt, config)


def detect_vae22(view: HeaderView) -> Detection | Mismatch:
    """The Wan 2.2 VAE (12 patchified input channels, nested residual levels), official or diffusers layout."""
    found = _layout(view)
    if isinstance(found, Mismatch):
        return found
    names, fmt = found
    conv1 = names.shape("encoder.conv1.weight")
    if len(conv1) != 5 or conv1[1] != 12:
        return Mismatch(f"encoder.conv1 has shape {conv1}: not the 2.2 VAE's 12-channel (2x2 patchified) 3D conv", 0.7)
    if "encoder.downsamples.0.downsamples.0.residual.0.gamma" not in names:
        return Mismatch("encoder.downsamples.0 has no nested residual blocks", 0.7)
    dim, z_dim = conv1[0], names.shape("conv2.weight")[0]
    levels = names.count_blocks("encoder.downsamples.")
    blocks = names.count_blocks(f"encoder.downsamples.{levels - 1}.downsamples.")
    dim_mult = tuple(
        names.shape(f"encoder.downsamples.{i}.downsamples.0.residual.2.weight")[0] // dim for i in range(levels)
    )
    stats = _stats(view, z_dim)
    if isinstance(stats, str):
        return Mismatch(stats, 0.6)
    config = WanVAE22Config(
        dim=dim,
        dec_dim=names.shape("decoder.head.2.weight")[1] // dim_mult[0],
        z_dim=z_dim,
        dim_mult=dim_mult,
        num_res_blocks=blocks,
        temperal_downsample=tuple(
            f"encoder.downsamples.{i}.downsamples.{blocks}.time_conv.weight" in names for i in range(levels - 1)
        ),
        **stats,
    )
    return Detection(fmt, config)


VAE21_SPEC = ModelSpec(
    name="wan.vae",
    family="wan",
    model_class=WanVAE,
    config_class=WanVAEConfig,
    detect=detect_vae21,
    formats={"official": None, "diffusers": diffusers_vae_recipe()},
)
VAE22_SPEC = ModelSpec(
    name="wan.vae22",
    family="wan",
    model_class=WanVAE22,
    config_class=WanVAE22Config,
    detect=detect_vae22,
    formats={"official": None, "diffusers": diffusers_vae_recipe()},
)
VAE_SPECS = [VAE21_SPEC, VAE22_SPEC]
