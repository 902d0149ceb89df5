"""The Qwen-Image prompt paths against diffusers 0.42, on a tiny Qwen2.5-VL and tokenizer built offline:
text-to-image (QwenImagePipeline.encode_prompt: template, 34 dropped tokens, last hidden states, padding to the
longest), Edit (QwenImageEditPipeline: its template, 64 dropped, one image through the VL processor) and
Edit-2509/2511 (QwenImageEditPlusPipeline: "Picture i:" labels, images at about 384^2); the 512-token guard; the
processor without torchvision; the text encoder spec in the current and the older transformers layouts.

``write_tokenizer`` and ``write_processor`` write the tiny tokenizer and processor folders the pipeline tests reuse.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel

from ds_loader import detect, load_model
from ds_models_qwen_image.specs import TEXT_ENCODER_SPEC, qwen25vl_config_from_shapes
from ds_models_qwen_image.text_encoder import (
    CONDITION_IMAGE_AREA,
    EDIT_IMAGE_AREA,
    MAX_PROMPT_TOKENS,
    PromptTooLongError,
    build_text_encoder,
    condition_size,
    encode_edit_prompt,
    encode_prompt,
    format_edit_prompt,
    format_prompt,
    load_processor,
    qwen25vl_7b_config,
    tiny_text_encoder_config,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# Qwen2.5-VL's special tokens, in the order of their released ids (151643...); here they follow the 256 byte tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PROMPTS = ["a red fox in the snow", "the cat and the hat, and a much longer caption than the first one"]
# Qwen/Qwen-Image-Edit/processor/preprocessor_config.json
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def write_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer (Qwen2 style) with Qwen2.5-VL's special tokens, as ``tokenizer/``; its vocab size
    (264: ``tiny_text_encoder_config``'s default, whose token ids fit it)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={char: index for index, char in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer.get_vocab_size()


def write_processor(folder: Path) -> None:
    """The edit releases' ``processor/`` folder: the tokenizer files and ``preprocessor_config.json``."""
    write_tokenizer(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR))


def randomize(module: torch.nn.Module, scale: float = 0.2) -> None:
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def picture(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_image_text")
    write_tokenizer(root / "tokenizer")
    write_processor(root / "processor")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    processor = load_processor(root / "processor")
    torch.manual_seed(0)
    reference = Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config()).eval()
    randomize(reference)
    encoder = build_text_encoder(tiny_text_encoder_config())
    encoder.load_state_dict(reference.model.state_dict())
    return tokenizer, processor, reference, encoder


def test_tiny_token_ids_fit_the_tokenizer(parts):
    tokenizer, *_ = parts
    config = tiny_text_encoder_config()
    assert len(tokenizer) == config.text_config.vocab_size
    for token, field in [("<|image_pad|>", "image_token_id"), ("<|vision_start|>", "vision_start_token_id")]:
        assert tokenizer.convert_tokens_to_ids(token) == getattr(config, field)


def test_encode_prompt_matches_diffusers(parts):
    tokenizer, _, reference, encoder = parts
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=reference, tokenizer=tokenizer, transformer=None)
    with torch.no_grad():
        expected, expected_mask = pipe.encode_prompt(list(PROMPTS), device="cpu")
        embeddings, mask = encode_prompt(encoder, tokenizer, PROMPTS)
    assert embeddings.shape == expected.shape and mask.dtype == torch.bool
    assert expected.std() > 0.1
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, expected_mask.bool())
    assert mask[0].sum() < mask[1].sum() and mask[1].all()
    assert mask[0].sum() == len(tokenizer(format_prompt(PROMPTS[0]))["input_ids"]) - 34


def test_one_prompt_has_an_all_true_mask_and_casts(parts):
    tokenizer, _, _, encoder = parts
    with torch.no_grad():
        embeddings, mask = encode_prompt(encoder, tokenizer, "a fox", dtype=torch.float64)
    assert mask.all() and embeddings.dtype == torch.float64


def diffusers_edit_size(image: Image.Image, area: int) -> tuple[int, int]:
    width, height = calculate_dimensions(area, image.size[0] / image.size[1])
    return int(width), int(height)


def test_encode_edit_prompt_matches_diffusers_edit(parts):
    tokenizer, processor, reference, encoder = parts
    pipe = QwenImageEditPipeline(
        scheduler=None, vae=None, text_encoder=reference, tokenizer=tokenizer, processor=processor, transformer=None
    )
    image = picture(64, 48, seed=1)
    width, height = diffusers_edit_size(image, EDIT_IMAGE_AREA)
    assert condition_size(*image.size, EDIT_IMAGE_AREA) == (width, height)
    # the VL encoder reads the image at about 1024^2; a small area keeps the test fast and is what diffusers does
    # with a pre-resized image too
    small = image.resize((width // 8 // 4 * 4, height // 8 // 4 * 4), Image.Resampling.LANCZOS)
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(PROMPTS[0], image=small, device="cpu")
        embeddings, mask = encode_edit_prompt(encoder, processor, PROMPTS[0], small, variant="edit", resize=False)
    assert embeddings.shape == expected.shape and mask.all() and expected.std() > 0.1
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("count", [1, 2])
def test_encode_edit_prompt_matches_diffusers_edit_plus(parts, count):
    tokenizer, processor, reference, encoder = parts
    pipe = QwenImageEditPlusPipeline(
        scheduler=None, vae=None, text_encoder=reference, tokenizer=tokenizer, processor=processor, transformer=None
    )
    images = [picture(96, 64, seed=2), picture(50, 80, seed=3)][:count]
    resized = []
    for image in images:  # as QwenImageEditPlusPipeline.__call__ prepares its condition images
        width, height = diffusers_edit_size(image, CONDITION_IMAGE_AREA)
        resized.append(pipe.image_processor.resize(image, height, width))
    with torch.no_grad():
        expected, _ = pipe.encode_prompt(PROMPTS[1], image=resized, device="cpu")
        embeddings, mask = encode_edit_prompt(encoder, processor, PROMPTS[1], images, variant="edit-plus")
    assert embeddings.shape == expected.shape and mask.all() and expected.std() > 0.1
    torch.testing.assert_close(embeddings, expected, rtol=1e-5, atol=1e-5)


def test_edit_batches_pad_to_the_longest(parts):
    _, processor, _, encoder = parts
    image = picture(40, 40, seed=4)
    with torch.no_grad():
        both, mask = encode_edit_prompt(encoder, processor, PROMPTS, image)
        singles = [encode_edit_prompt(encoder, processor, prompt, image)[0][0] for prompt in PROMPTS]
    for row, single in enumerate(singles):
        assert mask[row].sum() == single.shape[0]
        torch.testing.assert_close(both[row][mask[row]], single, rtol=1e-5, atol=1e-5)


def test_edit_templates():
    one = format_edit_prompt("make it blue", 1, "edit")
    assert "user\n<|vision_start|><|image_pad|><|vision_end|>make it blue<|im_end|>" in one
    two = format_edit_prompt("swap them", 2)
    assert (
        "user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>swap them<|im_end|>" in two
    )
    with pytest.raises(ValueError, match="one edit image, got 2"):
        format_edit_prompt("x", 2, "edit")
    with pytest.raises(ValueError, match="variant='plus'"):
        format_edit_prompt("x", 1, "plus")


def test_condition_sizes_follow_diffusers():
    for size in [(1328, 1328), (1920, 1080), (640, 960), (333, 777)]:
        for area in (CONDITION_IMAGE_AREA, EDIT_IMAGE_AREA):
            width, height = calculate_dimensions(area, size[0] / size[1])
            assert condition_size(*size, area) == (width, height)


def test_a_long_prompt_is_an_error_naming_its_length(parts):
    tokenizer, processor, _, encoder = parts
    prompt = "w" * 600
    length = len(tokenizer(format_prompt(prompt))["input_ids"]) - 34
    with pytest.raises(PromptTooLongError, match=f"prompt 1 is {length} tokens") as error:
        encode_prompt(encoder, tokenizer, ["short", prompt])
    assert isinstance(error.value, ValueError) and str(MAX_PROMPT_TOKENS) in str(error.value)
    fits = "w" * (MAX_PROMPT_TOKENS - (len(tokenizer(format_prompt(""))["input_ids"]) - 34))
    assert encode_prompt(encoder, tokenizer, fits)[1].shape[1] == MAX_PROMPT_TOKENS
    with pytest.raises(PromptTooLongError, match="prompt 0 is 513 tokens"):
        encode_prompt(encoder, tokenizer, fits + "w")
    with pytest.raises(PromptTooLongError, match="edit template"):
        encode_edit_prompt(encoder, processor, prompt, picture(32, 32, seed=5))
    with pytest.raises(ValueError, match="at least one prompt"):
        encode_prompt(encoder, tokenizer, [])


def test_edit_images_must_be_images(parts):
    _, processor, _, encoder = parts
    with pytest.raises(TypeError, match="edit image 1 is a Tensor"):
        encode_edit_prompt(encoder, processor, "x", [picture(32, 32, seed=6), torch.zeros(3, 32, 32)])
    with pytest.raises(ValueError, match="at least one edit image"):
        encode_edit_prompt(encoder, processor, "x", [])


def test_processor_needs_no_torchvision(parts, tmp_path):
    _, processor, *_ = parts
    assert type(processor.image_processor).__module__.endswith("image_processing_pil_qwen2_vl")
    assert processor.image_processor.patch_size == 14 and processor.image_processor.merge_size == 2
    with pytest.raises(FileNotFoundError, match=r"preprocessor_config\.json"):
        load_processor(tmp_path)


# --- loading -------------------------------------------------------------------------------------------------------


def _legacy(key: str) -> str:
    """transformers < 4.52 names of Qwen2_5_VLForConditionalGeneration (how the Qwen-Image release is saved)."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


@pytest.mark.parametrize("layout", ["transformers", "transformers-legacy", "qwen2_5_vl-model"])
def test_text_encoder_layouts_load(parts, tmp_path, layout):
    _, _, reference, encoder = parts
    state = {key: value.clone().contiguous() for key, value in reference.state_dict().items()}
    assert "lm_head.weight" in state and any(key.startswith("model.language_model.") for key in state)
    if layout == "transformers-legacy":
        state = {_legacy(key): value for key, value in state.items()}
    elif layout == "qwen2_5_vl-model":
        state = {key: value.clone().contiguous() for key, value in encoder.state_dict().items()}
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    reference.config.save_pretrained(folder)
    [match] = [m for m in detect(folder) if m.spec is TEXT_ENCODER_SPEC]
    assert match.format == layout
    loaded = load_model(folder, spec=TEXT_ENCODER_SPEC)
    assert isinstance(loaded, Qwen2_5_VLModel) and not loaded.training
    expected = encoder.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    ids = torch.tensor([[5, 9, 200, 13]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, encoder(input_ids=ids).last_hidden_state)


def test_save_pretrained_folder_loads(parts, tmp_path):
    _, _, reference, encoder = parts
    reference.save_pretrained(tmp_path / "text_encoder")
    loaded = load_model(tmp_path / "text_encoder", spec=TEXT_ENCODER_SPEC)
    assert loaded.config.text_config.num_attention_heads == 2 and loaded.config.image_token_id == 262
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, encoder.state_dict()[key]), key


def test_released_config_from_shapes_on_meta():
    config = qwen25vl_7b_config()
    with torch.device("meta"):
        model = Qwen2_5_VLModel(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    parameters = sum(math.prod(shape) for shape in shapes.values())
    # Hugging Face lists Qwen2.5-VL-7B-Instruct at 8.29 B parameters, its 152064 x 3584 LM head (not built) included
    assert round((parameters + 152064 * 3584) / 1e7) == 829
    inferred = qwen25vl_config_from_shapes(shapes)  # no config.json: the released head widths
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert getattr(inferred.text_config, name) == getattr(config.text_config, name), name
    for name in ("depth", "hidden_size", "num_heads", "out_hidden_size", "intermediate_size", "patch_size"):
        assert getattr(inferred.vision_config, name) == getattr(config.vision_config, name), name
    assert inferred.text_config.rope_parameters["mrope_section"] == [16, 24, 24]
    assert inferred.image_token_id == 151655
