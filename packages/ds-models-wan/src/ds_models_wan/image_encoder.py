"""Wan's image encoder: the vision tower of open-clip XLM-RoBERTa ViT-H/14 as transformers ``CLIPVisionModel``.

The official ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` holds the whole CLIP (``visual.*``,
``textual.*``, ``log_scale``); Wan reads only the vision tower. ``wan_clip_recipe`` renames it lazily. Facts the
mapping rests on, checked against Wan's ``wan/modules/clip.py`` and transformers' CLIP code:

- pre-norm ViT: the patch convolution has no bias (``pre_norm=True``), a class token, learned positions of
  ``(1, 257, 1280)``, a LayerNorm before the blocks (``pre_norm`` -> ``pre_layrnorm``), LayerNorms with eps 1e-5;
- the MLP uses exact (erf) GELU (``activation='gelu'``, ``nn.GELU()``), not CLIP's quick-GELU;
- attention is scaled by ``1/sqrt(head_dim)``; ``to_qkv`` is one Linear whose output splits as (q, k, v), each
  ``width`` wide, so the recipe cuts it into ``q_proj``, ``k_proj``, ``v_proj`` (views, no copy);
- ``cls_embedding`` ``(1, 1, D)`` is transformers' ``class_embedding`` ``(D,)``, ``pos_embedding`` ``(1, N, D)`` its
  ``position_embedding.weight`` ``(N, D)``; ``head`` (the projection to 1024) and the text tower are dropped.

``encode_image`` follows the official ``CLIPModel.visual``: bicubic resize to 224 x 224 (the aspect ratio is not
kept), ``[-1, 1] -> [0, 1]``, CLIP mean/std, and the tokens after the 31st of the 32 blocks, without the final
LayerNorm: ``(B, 257, 1280)``. diffusers' ``WanImageToVideoPipeline`` preprocesses with ``CLIPImageProcessor``
instead (shortest side to 224 with PIL's antialiased bicubic, then a centre crop), which equals ours only for
224 x 224 inputs; other sizes differ (ours stretches, as the model was used in the official code).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel

from ds_loader import Recipe, drop, rename, reshape, rule, split
from ds_loader.recipes import Expr, Key, KeyInfo
from ds_vram import get_vram_handle

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "build_clip_vision_model",
    "clip_vision_config_from_shapes",
    "clip_vision_heads",
    "clip_vision_transformers_recipe",
    "clip_vit_h14_config",
    "encode_image",
    "tiny_clip_vision_config",
    "vision_inner_prefix",
    "wan_clip_recipe",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_DIM = 80  # ViT-H/14: 1280 wide, 16 heads
TINY_HEAD_DIM = 16  # widths that are not a multiple of 80 are test sizes (tiny_clip_vision_config: 2 heads of 16)


def clip_vit_h14_config() -> CLIPVisionConfig:
    """The released vision tower: 224 px, patch 14, width 1280, 32 layers, 16 heads, MLP 5120, exact GELU,
    LayerNorm eps 1e-5 (``projection_dim`` 1024 describes the unused ``head``)."""
    return CLIPVisionConfig(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_channels=3,
        image_size=224,
        patch_size=14,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=1024,
    )


def tiny_clip_vision_config() -> CLIPVisionConfig:
    """The same architecture at test size: 28 px (2 x 2 patches of 14, so 5 tokens), width 32, 3 layers, 2 heads."""
    config = clip_vit_h14_config()
    config.update({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2})
    config.update({"image_size": 28, "projection_dim": 16})
    return config


def clip_vision_heads(width: int) -> int:
    """Heads when no ``config.json`` says: 80-wide heads (ViT-H/14) for multiples of 80, else 16-wide ones."""
    head_dim = HEAD_DIM if width % HEAD_DIM == 0 else TINY_HEAD_DIM
    return max(1, width // head_dim)


@cache
def vision_inner_prefix() -> str:
    """Where the installed transformers puts ``CLIPVisionModel``'s layers: ``"vision_model."`` (transformers 4,
    and files it saved) or ``""`` (transformers 5 flattened the class)."""
    with torch.device("meta"):
        model = CLIPVisionModel(
            CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1)
        )
    return "vision_model." if "vision_model.pre_layrnorm.weight" in model.state_dict() else ""


def _vision_fields(config_json: dict[str, Any] | None) -> dict[str, Any]:
    """Fields of a ``config.json``: a ``clip_vision_model`` one, or the ``vision_config`` of a full ``clip`` one."""
    if not config_json:
        return {}
    if config_json.get("model_type") == "clip" and isinstance(config_json.get("vision_config"), dict):
        config_json = config_json["vision_config"]
    elif config_json.get("model_type") != "clip_vision_model":
        return {}
    skip = ("architectures", "dtype", "torch_dtype", "model_type", "transformers_version")
    return {k: v for k, v in config_json.items() if not k.startswith("_") and k not in skip}


def clip_vision_config_from_shapes(
    shapes: dict[str, tuple[int, ...]], config_json: dict[str, Any] | None = None
) -> CLIPVisionConfig:
    """A ``CLIPVisionConfig`` from the shapes of a checkpoint in transformers names without the ``vision_model.``
    level (after ``wan_clip_recipe`` for the official layout).

    Width, patch size, image size (from the number of positions), depth and MLP width come from the shapes; the
    head count, activation and eps from ``config_json`` when present, else ``clip_vision_heads`` and the
    ViT-H/14 values (exact GELU, eps 1e-5).
    """
    width, channels, patch, _ = shapes["embeddings.patch_embedding.weight"]
    positions = shapes["embeddings.position_embedding.weight"][0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ValueError(f"{positions} positions is not a class token plus a square grid of patches")
    fields: dict[str, Any] = {
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "num_attention_heads": clip_vision_heads(width),
        "projection_dim": 1024,
        **_vision_fields(config_json),
    }
    fields.update(
        hidden_size=width,
        num_channels=channels,
        patch_size=patch,
        image_size=grid * patch,
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers.")),
        intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
    )
    return CLIPVisionConfig(**fields)


def build_clip_vision_model(config: CLIPVisionConfig) -> CLIPVisionModel:
    """A ``CLIPVisionModel`` for the loader (built under the meta device); its ``position_ids`` buffer is not
    saved in checkpoints, so it is made here, on the CPU."""
    model = CLIPVisionModel(config)
    embeddings = model.get_submodule(vision_inner_prefix() + "embeddings")
    positions = torch.arange(embeddings.num_positions, device="cpu")[None]
    embeddings.register_buffer("position_ids", positions, persistent=False)
    return model


# --- recipes -----------------------------------------------------------------------------------------------------


def wan_clip_recipe() -> Recipe:
    """The official open-clip file (``visual.*``) into ``CLIPVisionModel`` names; the text tower, ``head`` and
    ``log_scale`` are dropped. Renames, reshapes and slices only, so it stays lazy."""
    inner = vision_inner_prefix()
    layer = r"visual\.transformer\.(?P<i>\d+)\."
    out = inner + r"encoder.layers.\g<i>."
    p = r"\.(?P<p>weight|bias)"
    return Recipe(
        drop(r"textual\..*|log_scale|visual\.head(\..*)?"),
        rename(r"visual\.patch_embedding\.weight", inner + "embeddings.patch_embedding.weight"),
        reshape(r"visual\.cls_embedding", inner + "embeddings.class_embedding", lambda s: s[-1:]),
        reshape(r"visual\.pos_embedding", inner + "embeddings.position_embedding.weight", lambda s: s[-2:]),
        rename(r"visual\.pre_norm" + p, inner + r"pre_layrnorm.\g<p>"),
        rename(r"visual\.post_norm" + p, inner + r"post_layernorm.\g<p>"),
        split(layer + r"attn\.to_qkv" + p, [out + f"self_attn.{n}_proj.\\g<p>" for n in "qkv"]),
        rename(layer + r"attn\.proj" + p, out + r"self_attn.out_proj.\g<p>"),
        rename(layer + r"norm(?P<n>1|2)" + p, out + r"layer_norm\g<n>.\g<p>"),
        rename(layer + r"mlp\.0" + p, out + r"mlp.fc1.\g<p>"),
        rename(layer + r"mlp\.2" + p, out + r"mlp.fc2.\g<p>"),
    )


def _vision_key(match: re.Match[str], _: KeyInfo) -> dict[str, Expr]:
    return {vision_inner_prefix() + match.group("rest"): Key(match.string)}


def clip_vision_transformers_recipe() -> Recipe:
    """A diffusers ``image_encoder/`` folder (``CLIPVisionModel`` or ``CLIPVisionModelWithProjection``, with or
    without the ``vision_model.`` level) into the installed class's names; ``visual_projection`` (unused by Wan)
    and the ``position_ids`` buffer older files hold (ours is rebuilt) are dropped."""
    return Recipe(
        drop(r"(vision_model\.)?embeddings\.position_ids|visual_projection\.weight"),
        rule(r"(?:vision_model\.)?(?P<rest>.*)", _vision_key),
    )


# --- encoding ------------------------------------------------------------------------------------------------------


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    handle = get_vram_handle(model)
    if handle is not None:
        config = handle.config
        return torch.device(config.computation_device), config.computation_dtype or torch.float32
    for parameter in model.parameters():
        if not parameter.is_meta:
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


def encode_image(image_encoder: CLIPVisionModel, images: torch.Tensor) -> torch.Tensor:
    """CLIP tokens of ``images`` ``(B, 3, H, W)`` in ``[-1, 1]`` for the Wan DiT's ``clip_feature``.

    Resized (bicubic, not antialiased, as the official code) to the model's square size unless already there,
    mapped to ``[0, 1]``, normalised with the CLIP mean/std, and encoded; returns the hidden states after the
    second-to-last block, ``(B, 1 + (size / patch) ** 2, width)`` = ``(B, 257, 1280)`` for ViT-H/14, on the
    encoder's (computation) device and in its dtype.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) tensor in [-1, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")
    size = image_encoder.config.image_size
    device, dtype = _device_and_dtype(image_encoder)
    pixels = images.to(device=device, dtype=torch.float32)
    if tuple(pixels.shape[-2:]) != (size, size):
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", align_corners=False)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    pixels = ((pixels + 1) / 2 - mean) / std
    output = image_encoder(pixel_values=pixels.to(dtype), output_hidden_states=True)
    return output.hidden_states[-2]
