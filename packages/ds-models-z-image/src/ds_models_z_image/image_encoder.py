"""Z-Image-Omni-Base's image encoder: transformers' ``Siglip2VisionModel`` (SigLIP2 so400m, patch 16, NaFlex at 256
patches), configured, not rewritten.

The release ships it as ``siglip/model.safetensors`` (428 M parameters with the pooling head). The DiT reads the
last hidden states of the valid patches as a ``(rows, cols, 1152)`` grid, one per reference image; the images are
prepared by transformers' SigLIP2 image processor (mean and std 0.5, at most 256 patches of 16 pixels, aspect ratio
kept).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec, Recipe, strip_prefix

__all__ = [
    "IMAGE_ENCODER_SPEC",
    "MAX_PATCHES",
    "build_image_encoder",
    "detect_image_encoder",
    "encode_reference",
    "image_processor",
    "siglip2_428m_config",
]

MAX_PATCHES = 256  # the released processor's max_num_patches
PATCH_SIZE = 16
_PREFIX = "vision_model."  # transformers 4.x saved Siglip2VisionModel under this prefix; 5.x has none
_KEYS = ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight", "post_layernorm.weight")
KNOWN_HEAD_DIMS = (72, 64, 12)  # so400m (1152 / 16), base and large (64), the tiny test size (24 / 2)


def siglip2_428m_config() -> Siglip2VisionConfig:
    """The released encoder (``Tongyi-MAI/Z-Image-Omni-Base/siglip``): hidden 1152, 27 layers, 16 heads, MLP 4304,
    patch 16, 256 position embeddings, tanh GELU, LayerNorm eps 1e-6, with the pooling head."""
    return Siglip2VisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_channels=3,
        num_patches=MAX_PATCHES,
        patch_size=PATCH_SIZE,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
    )


def build_image_encoder(config: Siglip2VisionConfig) -> Siglip2VisionModel:
    """A ``Siglip2VisionModel`` in eval mode."""
    return Siglip2VisionModel(config).eval()


def image_processor(max_num_patches: int = MAX_PATCHES, patch_size: int = PATCH_SIZE) -> Any:
    """transformers' SigLIP2 image processor with the released settings (the PIL backend: no torchvision needed)."""
    from transformers import Siglip2ImageProcessorPil

    return Siglip2ImageProcessorPil(
        do_resize=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
        patch_size=patch_size,
        max_num_patches=max_num_patches,
        resample=2,  # PIL's BILINEAR
    )


def encode_reference(
    model: Siglip2VisionModel, processor: Any, image: Any, device: torch.device | str | None = None
) -> torch.Tensor:
    """A PIL image's SigLIP2 features as the DiT reads them: ``(rows, cols, hidden)``, the last hidden states of its
    valid patches (the processor's ``spatial_shapes``) in row-major order."""
    inputs = processor(images=[image], return_tensors="pt")
    rows, cols = (int(v) for v in inputs["spatial_shapes"][0])
    dtype = next(model.parameters()).dtype
    pixel_values = inputs["pixel_values"].to(device=device, dtype=dtype)
    hidden = model(
        pixel_values=pixel_values,
        pixel_attention_mask=inputs["pixel_attention_mask"].to(device),
        spatial_shapes=inputs["spatial_shapes"].to(device),
    ).last_hidden_state
    return hidden[0, : rows * cols].reshape(rows, cols, hidden.shape[-1])


def detect_image_encoder(view: HeaderView) -> Detection | Mismatch:
    """A transformers ``Siglip2VisionModel`` (keys under ``vision_model.`` as transformers 4 saves them, or bare as
    transformers 5 does), with its config inferred from shapes; SigLIP v1 (a Conv2d patch embedding) is refused."""
    for prefix, fmt in ((_PREFIX, "transformers"), ("", "bare")):
        if not all(prefix + key in view for key in _KEYS):
            continue
        patch = view.shape(prefix + "embeddings.patch_embedding.weight")
        if len(patch) != 2:
            return Mismatch("a convolutional patch embedding (SigLIP v1), not SigLIP2's linear one", 0.8)
        hidden, patch_dim = patch
        num_patches = view.shape(prefix + "embeddings.position_embedding.weight")[0]
        patch_size = round((patch_dim / 3) ** 0.5)
        if 3 * patch_size * patch_size != patch_dim:
            return Mismatch(f"patch embedding input {patch_dim} is not 3 x p x p", 0.8)
        head_dim = next((d for d in KNOWN_HEAD_DIMS if hidden % d == 0), None)
        if head_dim is None:
            return Mismatch(f"no known head width divides the hidden size {hidden}", 0.7)
        config = Siglip2VisionConfig(
            hidden_size=hidden,
            intermediate_size=view.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
            num_hidden_layers=view.count_blocks(prefix + "encoder.layers."),
            num_attention_heads=hidden // head_dim,
            num_channels=3,
            num_patches=num_patches,
            patch_size=patch_size,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            vision_use_head=prefix + "head.probe" in view,
        )
        return Detection(fmt, config)
    return Mismatch("no SigLIP2 vision embeddings / post_layernorm", 0.0)


IMAGE_ENCODER_SPEC = ModelSpec(
    name="z-image.image_encoder",
    family="z-image",
    model_class=Siglip2VisionModel,
    config_class=Siglip2VisionConfig,
    detect=detect_image_encoder,
    formats={"transformers": Recipe(strip_prefix(_PREFIX)), "bare": None},
    build=build_image_encoder,
    never_fp8=("embeddings.*",),
)
