"""Pieces of the demo-digits model that are not the DiT: data, tokenizers, text encoders and the VAE stage.

``train.py`` uses these; they are kept apart so each stays short and can be read on its own.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from ds_models_flux import FluxVAE, FluxVAEConfig

SIZE = 32  # pixels per side of the upscaled digits (4x4 latents, 2x2 DiT tokens)
TEXT_LENGTH = 8  # tokens per prompt for both encoders (the tokenizers declare it as model_max_length)
TEXT_WIDTH = 64  # CLIP hidden size (the DiT's vec_in_dim) and T5 d_model (its context_in_dim)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WORDS = ("a", "handwritten", "digit", "number", "of", "the", *NUMBER_WORDS)
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VAE_CONFIG = FluxVAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)


def caption(label: int) -> str:
    return f"a handwritten digit {label}"


# --------------------------------------------------------------------------------------------------- data
def load_digits_images() -> tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's 1797 8x8 digits upscaled (bicubic) to ``SIZE``, grey replicated to RGB, in [-1, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    big = F.interpolate(small, size=(SIZE, SIZE), mode="bicubic", align_corners=False).clamp(0, 1)
    return (big * 2 - 1).expand(-1, 3, -1, -1).contiguous(), digits.target.astype(np.int64)


def write_dataset(images: torch.Tensor, labels: np.ndarray, folder: Path) -> None:
    """The digits as a ds-train folder: ``00000.png`` with ``00000.txt`` holding its caption."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for index, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        Image.fromarray(image).save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(caption(int(label)) + "\n")


# ---------------------------------------------------------------------------------------------- tokenizers
def _bpe_chain(word: str) -> list[tuple[str, str]]:
    """Merges that build ``word</w>`` from its characters, left to right."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    merges, current = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((current, piece))
        current += piece
    return merges


def write_clip_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer whose vocabulary holds the prompt words whole, the digits and single letters (any
    other word falls apart into letters; other characters become end-of-text, CLIP's unknown token). End-of-text
    is the largest id, as in CLIP's real vocabulary (the pooled output is read at argmax(ids))."""
    vocab = [*LETTERS, *(c + "</w>" for c in LETTERS), *(d + "</w>" for d in "0123456789")]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        for left, right in _bpe_chain(word):
            if (left, right) not in merges:
                merges.append((left, right))
                if left + right not in vocab:
                    vocab.append(left + right)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": TEXT_LENGTH, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|endoftext|>"}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "<|endoftext|>"}, indent=2))
    return len(vocab)


def write_t5_tokenizer(folder: Path) -> int:
    """A unigram T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) with the prompt words and digits whole."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + word, -1.0) for word in WORDS if word != "a"] + [("▁a", -1.0)]
    pieces += [("▁" + d, -1.0) for d in "0123456789"] + [(d, -2.0) for d in "0123456789"]
    pieces += [("▁" + c, -3.0) for c in LETTERS if c != "a"] + [(c, -4.0) for c in LETTERS] + [("▁", -5.0)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config.update(extra_ids=0, model_max_length=TEXT_LENGTH)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(pieces)


# ------------------------------------------------------------------------------------------- text encoders
def _spread(model: torch.nn.Module, seed: int) -> None:
    """Random weights large enough that each prompt word moves the outputs clearly (the encoders stay frozen:
    the DiT learns to read them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "norm" in name and parameter.ndim == 1:
                parameter.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.05 * noise)
            elif parameter.ndim == 2 and "embed" not in name and "relative_attention_bias" not in name:
                parameter.copy_(noise / math.sqrt(parameter.shape[1]))
            else:
                parameter.copy_(0.5 * noise)


def write_text_encoders(root: Path, clip_vocab: int, t5_vocab: int, seed: int) -> None:
    """Frozen random CLIP (pooled, 64 wide) and T5 (64 wide) encoders in ``text_encoder*/`` as transformers
    saves them."""
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_vocab,
            hidden_size=TEXT_WIDTH,
            intermediate_size=2 * TEXT_WIDTH,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=TEXT_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=TEXT_WIDTH,
            bos_token_id=clip_vocab - 2,
            eos_token_id=2,  # legacy: the pooled output is read at argmax(input_ids), end-of-text
            pad_token_id=clip_vocab - 1,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_vocab,
            d_model=TEXT_WIDTH,
            d_kv=16,
            num_heads=4,
            d_ff=2 * TEXT_WIDTH,
            num_layers=2,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
            dropout_rate=0.0,
        )
    )
    for index, (name, model) in enumerate((("text_encoder", clip), ("text_encoder_2", t5))):
        _spread(model, seed + index)
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "position_ids" not in k}
        if name == "text_encoder_2":
            state.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight, as transformers saves it
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("transformers_version", None)
        config["architectures"] = [type(model).__name__]
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------------- VAE
def _warmup_cosine(step: int, total: int, warmup: int = 20) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(images: torch.Tensor, steps: int, batch_size: int, seed: int, kl_weight: float = 1e-3) -> FluxVAE:
    """The FLUX.1 VAE architecture at width 32, trained as an autoencoder on the digits.

    The loss is reconstruction (MSE) plus a small KL term measured on the *scaled* latents
    ``scale_factor * (z - shift_factor)`` that the DiT sees, so their posterior is pulled toward N(0, 1) there:
    the released scale and shift factors stay valid and flow matching gets unit-scale latents.
    """
    torch.manual_seed(seed)
    vae = FluxVAE(VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup_cosine(step, steps))
    generator = torch.Generator().manual_seed(seed)
    scale, shift = VAE_CONFIG.scale_factor, VAE_CONFIG.shift_factor
    start, recon, kl = time.perf_counter(), torch.tensor(0.0), torch.tensor(0.0)
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        mean, logvar = vae.encoder(batch).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        scaled_mean, scaled_logvar = scale * (mean - shift), logvar + 2 * math.log(scale)
        noise = torch.randn(mean.shape, generator=generator)
        latents = scaled_mean + torch.exp(0.5 * scaled_logvar) * noise
        recon = F.mse_loss(vae.decode(latents), batch)
        kl = 0.5 * (scaled_mean.square() + scaled_logvar.exp() - 1 - scaled_logvar).mean()
        loss = recon + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(
                f"vae step {step:5d}  recon {recon.item():.4f}  kl {kl.item():.3f}  {time.perf_counter() - start:.0f}s"
            )
    vae.final_losses = {"recon": recon.item(), "kl": kl.item()}  # type: ignore[attr-defined]
    return vae.eval()


# -------------------------------------------------------------------------------------------------- checks
def to_8x8(image: Image.Image) -> np.ndarray:
    """A generated RGB image as scikit-learn's digits are stored: 8x8 grey, 0 (background) to 16 (ink), flat."""
    grey = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32))[None, None] / 255.0
    small = F.adaptive_avg_pool2d(grey, 8)[0, 0]
    return (small * 16).clamp(0, 16).reshape(64).numpy()


MODEL_CARD = """# demo-digits

A tiny FLUX.1 (the real architecture: DiT with 2 double- and 2 single-stream blocks at width 128, no guidance
embedding; the FLUX.1 VAE at width 32; CLIP and T5 text encoders at width 64, random and frozen) trained on
scikit-learn's 8x8 handwritten digits upscaled to 32x32. Prompt: "a handwritten digit 7".

Made by examples/demo_digits/train.py in DiffSynth Studio; the layout is that of black-forest-labs/FLUX.1-schnell.
Sampled with the preset's defaults: 32x32 pixels, 12 steps, classifier-free guidance 2.0 (negative prompt "").
Weights are float16. Training data: scikit-learn's copy of the UCI ML hand-written digits dataset.
"""
