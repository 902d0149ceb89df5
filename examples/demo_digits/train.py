"""Train the ``demo-digits`` model: a tiny FLUX.1 (the real architecture) on scikit-learn's 8x8 digits.

    OMP_NUM_THREADS=2 uv run python examples/demo_digits/train.py

writes the preset's files into ``packages/ds-models-flux/src/ds_models_flux/demo_digits/`` (``--output`` to put
them elsewhere), laid out like black-forest-labs/FLUX.1-schnell: ``flux1-demo-digits.safetensors`` (DiT),
``ae.safetensors`` (VAE), ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``. Stages:

1. tokenizers covering the prompt words, and frozen random CLIP and T5 encoders (64 wide);
2. the FLUX.1 VAE at width 32, trained here as an autoencoder (reconstruction + small KL) on the digits
   upscaled to 32x32;
3. the DiT (width 128, 2 double + 2 single blocks, no guidance embedding), trained from scratch with
   ``ds_train`` (full fine-tuning of "dit", flow matching) on a folder of PNGs captioned "a handwritten digit N",
   with caption dropout so that classifier-free guidance works;
4. a check: 50 samples (5 per digit) drawn with the preset's defaults through ``FluxImagePipeline``, recognised
   by a logistic regression trained on the 8x8 digits.

Everything is seeded; on one machine with one torch version the files come out bit for bit the same. Weights are
stored in float16 (the loader casts them to the dtype asked for).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build

from ds_models_flux import FluxDiT, FluxDiTConfig

PACKAGE_FOLDER = Path(__file__).resolve().parents[2] / "packages/ds-models-flux/src/ds_models_flux/demo_digits"
DIT_FILE = "flux1-demo-digits.safetensors"
DIT_CONFIG = FluxDiTConfig(
    hidden_size=128,
    num_heads=4,
    depth=2,
    depth_single_blocks=2,
    context_in_dim=build.TEXT_WIDTH,
    vec_in_dim=build.TEXT_WIDTH,
    axes_dim=(8, 12, 12),
    guidance_embed=False,
)
STORAGE_DTYPE = torch.float16


def _save(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None = STORAGE_DTYPE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cast = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}
    save_file({k: cast[k].contiguous() for k in sorted(cast)}, path, metadata={"format": "pt"})
    path.chmod(0o644)


def initial_dit(seed: int) -> FluxDiT:
    """A fresh DiT whose output layer is zero (it starts by predicting zero velocity, a stable start)."""
    torch.manual_seed(seed)
    dit = FluxDiT(DIT_CONFIG)
    with torch.no_grad():
        dit.final_layer.linear.weight.zero_()
        dit.final_layer.linear.bias.zero_()
    return dit


def prepare(folder: Path, images: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Stages 1 and 2, and the untrained DiT: a complete model folder ds_train starts from."""
    clip_vocab = build.write_clip_tokenizer(folder / "tokenizer")
    t5_vocab = build.write_t5_tokenizer(folder / "tokenizer_2")
    build.write_text_encoders(folder, clip_vocab, t5_vocab, seed=args.seed + 1)
    vae = build.train_vae(images, args.vae_steps, args.vae_batch_size, seed=args.seed + 2)
    _save(vae.state_dict(), folder / "ae.safetensors")
    _save(initial_dit(args.seed + 3).state_dict(), folder / DIT_FILE, dtype=None)
    return vae.final_losses


def train_dit(model: Path, data: Path, run: Path, args: argparse.Namespace) -> object:
    """Stage 3, with ds_train: flow matching on cached latents and prompt embeddings, float32 on the CPU."""
    from ds_train import TrainingConfig, train

    config = TrainingConfig(
        model=str(model),
        data=str(data),
        output=str(run),
        mode="full",
        trainable=("dit",),
        steps=args.dit_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler="cosine",
        lr_warmup_steps=50,
        max_grad_norm=None,
        height=build.SIZE,
        width=build.SIZE,
        caption_dropout=0.1,  # the empty prompt, for classifier-free guidance
        seed=args.seed,
        mixed_precision="no",
        device="cpu",
        cache=True,
        checkpoint_every=0,
        tensorboard=False,
        progress_bar=False,
        print_memory_estimate=False,
        log_every=100,
    )
    return train(config)


def evaluate(folder: Path, seeds: int = 5) -> float:
    """Stage 4: the share of ``10 * seeds`` samples, drawn as ``diffsynth generate`` does with the preset's
    defaults, that a logistic regression on the 8x8 digits reads as the digit asked for."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from ds_pipelines import FluxImagePipeline
    from ds_pipelines.catalog import preset_defaults

    digits = load_digits()
    classifier = LogisticRegression(max_iter=5000).fit(digits.data, digits.target)
    pipe = FluxImagePipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu", progress_bar=False)
    options = preset_defaults("demo-digits")
    wanted = [digit for digit in range(10) for _ in range(seeds)]
    images = [pipe(build.caption(digit), seed=index % seeds, **options) for index, digit in enumerate(wanted)]
    seen = classifier.predict(np.stack([build.to_8x8(image) for image in images]))
    print("read as:", " ".join(f"{w}->{s}" for w, s in zip(wanted, seen, strict=True)))
    return float(np.mean(np.array(wanted) == seen))


def _replace_folder(staged: Path, target: Path) -> None:
    """Swap the finished folder in (a crash leaves the old files or the new ones, never a mix)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=PACKAGE_FOLDER, help="where the model folder goes")
    parser.add_argument("--work", type=Path, help="keep the dataset and ds_train's run folder here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--vae-batch-size", type=int, default=16)
    parser.add_argument("--dit-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on the count)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="demo-digits-"))
    staged = args.output.with_name(args.output.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    images, labels = build.load_digits_images()
    vae_losses = prepare(staged, images, args)
    build.write_dataset(images, labels, work / "data")
    result = train_dit(staged, work / "data", work / "run", args)
    _save(load_file(result.weights_path), staged / DIT_FILE)
    (staged / "README.md").write_text(build.MODEL_CARD)
    _replace_folder(staged, args.output)
    train_seconds = time.perf_counter() - start
    accuracy = evaluate(args.output)
    summary = {
        "vae_recon_loss": round(vae_losses["recon"], 5),
        "vae_kl": round(vae_losses["kl"], 4),
        "dit_final_loss": round(float(result.final_loss), 5),
        "classifier_accuracy": accuracy,
        "training_seconds": round(train_seconds),
        "shipped_bytes": sum(p.stat().st_size for p in args.output.rglob("*") if p.is_file()),
    }
    print(json.dumps(summary, indent=2))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
