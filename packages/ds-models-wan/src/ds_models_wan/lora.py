"""Where LoRA layers of Wan land in the official-named DiT: diffusers ``WanTransformer3DModel`` module names and
kohya / musubi-tuner flat names, both ways. Wan fuses no layers, so every map is one to one."""

from __future__ import annotations

import re

from ds_loader.families import LoraTarget

__all__ = ["LORA_SIGN", "wan_diffusers_lora_name", "wan_layer_from_flat", "wan_lora_target"]

# Block-level names that give a Wan LoRA away, in any key convention (official, diffusers, kohya flat).
LORA_SIGN = re.compile(r"(?:^|\.|lora_unet_)blocks[._]\d+[._](?:self_attn|cross_attn|attn1|attn2|ffn)(?:[._]|$)")

_DIFFUSERS_LORA = [
    (r"blocks\.(\d+)\.attn1\.to_(q|k|v)", r"blocks.\1.self_attn.\2"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0", r"blocks.\1.self_attn.o"),
    (r"blocks\.(\d+)\.attn2\.to_(q|k|v)", r"blocks.\1.cross_attn.\2"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0", r"blocks.\1.cross_attn.o"),
    (r"blocks\.(\d+)\.attn2\.add_(k|v)_proj", r"blocks.\1.cross_attn.\2_img"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj", r"blocks.\1.ffn.0"),
    (r"blocks\.(\d+)\.ffn\.net\.2", r"blocks.\1.ffn.2"),
    (r"proj_out", "head.head"),
    (r"condition_embedder\.text_embedder\.linear_(1|2)", "text_embedding.{}"),
    (r"condition_embedder\.time_embedder\.linear_(1|2)", "time_embedding.{}"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
]
_DIFFUSERS_LORA_COMPILED = [(re.compile(pattern), template) for pattern, template in _DIFFUSERS_LORA]


def wan_lora_target(module_name: str) -> LoraTarget | None:
    """Our (official Wan) layer for a diffusers ``WanTransformer3DModel`` module name, or None."""
    for pattern, template in _DIFFUSERS_LORA_COMPILED:
        match = pattern.fullmatch(module_name)
        if match:
            if "{}" in template:  # linear_1 / linear_2 -> .0 / .2
                return LoraTarget(template.format(0 if match[1] == "1" else 2))
            return LoraTarget(match.expand(template))
    return None


# Our (official) layer -> its diffusers module, the inverse of _DIFFUSERS_LORA (1:1: Wan fuses no layers). The
# patterns are also the vocabulary of LoRA-able Wan layers that kohya flat names are read against.
_OFFICIAL_LORA = [
    (r"blocks\.(?P<i>\d+)\.self_attn\.(?P<p>q|k|v)", "blocks.{i}.attn1.to_{p}"),
    (r"blocks\.(?P<i>\d+)\.self_attn\.o", "blocks.{i}.attn1.to_out.0"),
    (r"blocks\.(?P<i>\d+)\.cross_attn\.(?P<p>q|k|v)", "blocks.{i}.attn2.to_{p}"),
    (r"blocks\.(?P<i>\d+)\.cross_attn\.o", "blocks.{i}.attn2.to_out.0"),
    (r"blocks\.(?P<i>\d+)\.cross_attn\.(?P<p>k|v)_img", "blocks.{i}.attn2.add_{p}_proj"),
    (r"blocks\.(?P<i>\d+)\.ffn\.0", "blocks.{i}.ffn.net.0.proj"),
    (r"blocks\.(?P<i>\d+)\.ffn\.2", "blocks.{i}.ffn.net.2"),
    (r"head\.head", "proj_out"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"img_emb\.proj\.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    (r"img_emb\.proj\.3", "condition_embedder.image_embedder.ff.net.2"),
]
_OFFICIAL_LORA_COMPILED = [(re.compile(pattern), template) for pattern, template in _OFFICIAL_LORA]
# kohya/musubi-tuner flat names (blocks_0_cross_attn_k_img): dots become underscores, which makes a flat name
# ambiguous on its own (k_img, self_attn), so it is matched against the vocabulary above instead of split.
_FLAT_LORA_COMPILED = [
    (re.compile(pattern.replace(r"\.", "_")), re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern).replace(r"\.", "."))
    for pattern, _ in _OFFICIAL_LORA
]


def wan_diffusers_lora_name(layer: str) -> str | None:
    """The diffusers ``WanTransformer3DModel`` module a LoRA on our (official) ``layer`` is saved under, or None."""
    for pattern, template in _OFFICIAL_LORA_COMPILED:
        match = pattern.fullmatch(layer)
        if match:
            return template.format(**match.groupdict())
    return None


def wan_layer_from_flat(flat: str) -> str | None:
    """Our layer for a kohya flat name without its ``lora_unet_`` prefix (``blocks_0_self_attn_q``), or None."""
    for pattern, template in _FLAT_LORA_COMPILED:
        match = pattern.fullmatch(flat)
        if match:
            return template.format(**match.groupdict())
    return None
