"""The Qwen-Image text encoder: transformers' Qwen2.5-VL-7B, configured, not rewritten, and the prompt templates.

We build ``Qwen2_5_VLModel`` (the vision tower and the language model) rather than
``Qwen2_5_VLForConditionalGeneration``: the DiT reads the last hidden states, never logits, so the LM head (a
152064 x 3584 matrix, 1.1 GB in bfloat16) is not built and its checkpoint tensor is dropped when loading. The hidden
states are the same, since the generation class only adds that head on top of this model.

Prompts are wrapped in a chat template with a fixed system prompt; the template's leading tokens (34 for
text-to-image, 64 for editing: the system turn and ``<|im_start|>user\\n``) are dropped from the hidden states, as
in the official pipelines and diffusers 0.42 (``QwenImagePipeline``, ``QwenImageEditPipeline``,
``QwenImageEditPlusPipeline``). Edit prompts carry their reference images through the VL processor: the image's
vision tokens stay in the embeddings the DiT reads.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLProcessor

__all__ = [
    "CONDITION_IMAGE_AREA",
    "EDIT_DROP_TOKENS",
    "EDIT_IMAGE_AREA",
    "EDIT_TEMPLATE",
    "MAX_PROMPT_TOKENS",
    "PICTURE_LABEL",
    "PROMPT_DROP_TOKENS",
    "PROMPT_TEMPLATE",
    "EditVariant",
    "PromptTooLongError",
    "build_text_encoder",
    "build_text_encoder_for_loader",
    "condition_size",
    "encode_edit_prompt",
    "encode_prompt",
    "format_edit_prompt",
    "format_prompt",
    "load_processor",
    "qwen25vl_7b_config",
    "resize_for_encoder",
    "tiny_text_encoder_config",
]

MAX_PROMPT_TOKENS = 512  # the official pipeline's max_sequence_length, counted after the dropped template prefix

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPT_DROP_TOKENS = 34
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_DROP_TOKENS = 64
VISION_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
PICTURE_LABEL = "Picture {}: " + VISION_PLACEHOLDER  # Edit-2509 / 2511, one per reference image, numbered from 1
# Pixel areas the reference images are resized to for the VL encoder: the original Edit model reads its one image at
# about 1024^2 (the size it also encodes with the VAE); Edit-2509/2511 read each image at about 384^2.
EDIT_IMAGE_AREA = 1024 * 1024
CONDITION_IMAGE_AREA = 384 * 384

EditVariant = Literal["edit", "edit-plus"]


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the DiT reads; the official pipeline would cut it silently."""


# ---------------------------------------------------------------------------------------------- configs and models
def qwen25vl_7b_config() -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct as released in ``Qwen/Qwen-Image/text_encoder/config.json``."""
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": 152064,
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": 28,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "hidden_act": "silu",
            "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "use_cache": False,
        },
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "out_hidden_size": 3584,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
    )


def tiny_text_encoder_config(
    vocab_size: int = 264,
    hidden_size: int = 32,
    image_token_id: int = 262,
    video_token_id: int = 263,
    vision_start_token_id: int = 259,
    vision_end_token_id: int = 260,
) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL at test size: 2 text layers (2 heads of 16, mRoPE sections 2/3/3), a 2-block vision tower of width
    32 (patch 14, 2x2 merge, the second block full attention) projecting to ``hidden_size``. The token ids must be
    those of the tokenizer it is used with (the defaults fit the tests' byte-level tokenizer)."""
    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
            "bos_token_id": None,
            "eos_token_id": None,
            "use_cache": False,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [1],
        },
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        vision_start_token_id=vision_start_token_id,
        vision_end_token_id=vision_end_token_id,
        tie_word_embeddings=False,
    )


def build_text_encoder(config: Qwen2_5_VLConfig) -> Qwen2_5_VLModel:
    """A ``Qwen2_5_VLModel`` (vision tower and language model, no LM head) in eval mode."""
    return Qwen2_5_VLModel(config).eval()


def _rebuilt(module: torch.nn.Module, config: Any, dim: int) -> torch.nn.Module:
    # transformers 5 builds rotary embeddings from the config; 4.x built the vision one from its width.
    takes_config = "config" in inspect.signature(type(module).__init__).parameters
    with torch.device("cpu"):
        return type(module)(config) if takes_config else type(module)(dim)


def build_text_encoder_for_loader(config: Qwen2_5_VLConfig) -> Qwen2_5_VLModel:
    """A ``Qwen2_5_VLModel`` for the loader (built under the meta device).

    Its rotary ``inv_freq`` buffers (text and vision) are not saved in checkpoints, so they are computed here, on
    the CPU, where the loader and ds-vram find them.
    """
    model = Qwen2_5_VLModel(config)
    text = model.language_model
    text.rotary_emb = _rebuilt(text.rotary_emb, config.text_config, 0)
    vision = config.vision_config
    rotary = model.visual.rotary_pos_emb
    model.visual.rotary_pos_emb = _rebuilt(rotary, vision, vision.hidden_size // vision.num_heads // 2)
    return model.eval()


# ---------------------------------------------------------------------------------------------- templates
def format_prompt(prompt: str) -> str:
    """The text-to-image chat template around ``prompt``."""
    return PROMPT_TEMPLATE.format(prompt)


def format_edit_prompt(prompt: str, num_images: int, variant: EditVariant = "edit-plus") -> str:
    """The edit chat template around ``prompt``: the original Edit model puts its one image's placeholder before the
    instruction; Edit-2509/2511 label each image ``Picture i:`` (from 1) before it."""
    if variant == "edit":
        if num_images != 1:
            raise ValueError(f"Qwen-Image-Edit reads one edit image, got {num_images} (Edit-2509/2511 read more)")
        return EDIT_TEMPLATE.format(VISION_PLACEHOLDER + prompt)
    if variant != "edit-plus":
        raise ValueError(f"variant={variant!r} must be 'edit' (Qwen-Image-Edit) or 'edit-plus' (Edit-2509/2511)")
    labels = "".join(PICTURE_LABEL.format(index + 1) for index in range(num_images))
    return EDIT_TEMPLATE.format(labels + prompt)


def condition_size(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels with the aspect ratio of ``width x height``, each a multiple of 32,
    as the official edit pipelines size reference images."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    return round(new_width / 32) * 32, round(new_width / ratio / 32) * 32


def resize_for_encoder(image: Image.Image, variant: EditVariant = "edit-plus") -> Image.Image:
    """A reference image at the size the VL encoder reads it: about 1024^2 for Edit, 384^2 for Edit-2509/2511,
    resized with LANCZOS (as diffusers' image processor does)."""
    area = EDIT_IMAGE_AREA if variant == "edit" else CONDITION_IMAGE_AREA
    return image.resize(condition_size(*image.size, area), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------------------------------------- encoding
def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("encoding needs at least one prompt")
    return prompts


def _check_lengths(lengths: Sequence[int], drop: int, what: str) -> None:
    for index, length in enumerate(lengths):
        if length - drop > MAX_PROMPT_TOKENS:
            raise PromptTooLongError(
                f"prompt {index} is {length - drop} tokens after the {what} template's first {drop}; Qwen-Image reads "
                f"at most {MAX_PROMPT_TOKENS}. Shorten it (the official pipeline would silently drop the rest)"
            )


def _device(text_encoder: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(text_encoder.parameters()).device


def _embed(
    text_encoder: torch.nn.Module, inputs: Any, drop: int, device: torch.device, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states of the valid tokens after the first ``drop``, zero-padded to the longest prompt."""
    mask = inputs["attention_mask"].to(device)
    extra = {name: inputs[name].to(device) for name in ("pixel_values", "image_grid_thw") if name in inputs}
    if "pixel_values" in extra:
        extra["pixel_values"] = extra["pixel_values"].to(next(text_encoder.parameters()).dtype)
    output = text_encoder(
        input_ids=inputs["input_ids"].to(device), attention_mask=mask, output_hidden_states=True, **extra
    )
    hidden = output.hidden_states[-1]
    rows = [hidden[i][mask[i].bool()][drop:] for i in range(hidden.shape[0])]
    longest = max(row.shape[0] for row in rows)
    embeddings = hidden.new_zeros(len(rows), longest, hidden.shape[-1])
    valid = torch.zeros(len(rows), longest, dtype=torch.bool, device=hidden.device)
    for i, row in enumerate(rows):
        embeddings[i, : row.shape[0]] = row
        valid[i, : row.shape[0]] = True
    return (embeddings if dtype is None else embeddings.to(dtype)), valid


def encode_prompt(
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    prompts: str | Sequence[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode text-to-image prompts for the DiT: ``(embeddings (B, L, 3584), mask (B, L) bool)``.

    Each prompt is wrapped in ``PROMPT_TEMPLATE``, tokenized (padded to the longest), run through the encoder with
    its attention mask; the last hidden states of the valid tokens, without the template's first 34, are packed to
    the left and zero-padded to the longest prompt, ``mask`` marking the valid ones (diffusers returns no mask when
    all are valid; ours is then all True). ``dtype`` casts the embeddings (None: the encoder's). Raises
    ``PromptTooLongError`` (a ``ValueError``) naming the count when a prompt has more than 512 tokens after the
    drop, where the official pipeline would cut it.
    """
    prompts = _prompt_list(prompts)
    texts = [format_prompt(prompt) for prompt in prompts]
    _check_lengths([len(tokenizer(text)["input_ids"]) for text in texts], PROMPT_DROP_TOKENS, "text-to-image")
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    return _embed(text_encoder, inputs, PROMPT_DROP_TOKENS, _device(text_encoder, device), dtype)


def _images(images: Image.Image | Sequence[Image.Image]) -> list[Image.Image]:
    images = [images] if isinstance(images, Image.Image) else list(images)
    if not images:
        raise ValueError("encode_edit_prompt needs at least one edit image")
    for index, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"edit image {index} is a {type(image).__name__}, not a PIL image")
    return images


def encode_edit_prompt(
    text_encoder: torch.nn.Module,
    processor: Qwen2VLProcessor,
    prompts: str | Sequence[str],
    images: Image.Image | Sequence[Image.Image],
    variant: EditVariant = "edit-plus",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    resize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode edit instructions with their reference images: ``(embeddings (B, L, 3584), mask (B, L) bool)``.

    variant: ``"edit"`` (Qwen-Image-Edit: one image, its placeholder before the instruction, the image read at about
        1024^2) or ``"edit-plus"`` (Edit-2509/2511: one or more images, each labelled ``Picture i:``, read at about
        384^2). Every prompt sees all ``images``, in order.
    resize: resize each image as the official pipeline does (``resize_for_encoder``); False passes them as given.

    The processor expands each image placeholder into the image's vision tokens; the last hidden states of the
    valid tokens without the template's first 64 (vision tokens included) are returned as in ``encode_prompt``.
    Raises ``PromptTooLongError`` when a prompt's text (each image placeholder counted once) has more than 512
    tokens after the drop.
    """
    prompts = _prompt_list(prompts)
    images = _images(images)
    texts = [format_edit_prompt(prompt, len(images), variant) for prompt in prompts]
    tokenizer = processor.tokenizer
    _check_lengths([len(tokenizer(text)["input_ids"]) for text in texts], EDIT_DROP_TOKENS, "edit")
    if resize:
        images = [resize_for_encoder(image, variant) for image in images]
    inputs = processor(text=texts, images=images * len(texts), padding=True, return_tensors="pt")
    return _embed(text_encoder, inputs, EDIT_DROP_TOKENS, _device(text_encoder, device), dtype)


# ---------------------------------------------------------------------------------------------- processor
def _pil_image_processor_class() -> type:
    # transformers 5 names the PIL (numpy) backend Qwen2VLImageProcessorPil and gives the default name to a
    # torchvision backend; in 4.x the default Qwen2VLImageProcessor is the PIL one.
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    return Qwen2VLImageProcessorPil


class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with no video processor: transformers' video processors need torchvision, which we do
    not depend on, and Qwen-Image never passes videos."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def load_processor(folder: str | Path) -> Qwen2VLProcessor:
    """The VL processor of an edit release (``processor/``: tokenizer files and ``preprocessor_config.json``), built
    over transformers' PIL image processor so it needs no torchvision."""
    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{folder} has no preprocessor_config.json: not a Qwen2-VL processor folder")
    image_processor = _pil_image_processor_class().from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return _ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
