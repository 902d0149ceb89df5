"""Train a Z-Image LoRA on a folder of images, then generate with it.

    python examples/z_image/lora_training.py --data my_dataset --trigger "sks style" --steps 1000
    accelerate launch examples/z_image/lora_training.py --data my_dataset   # several GPUs (accelerate config)

Train the base model (z-image), not Turbo: Turbo is distilled for 8 steps without CFG, and plain fine-tuning
erodes that: a LoRA trained on Turbo samples best with base-like settings (about 30 steps, cfg 2), as upstream
DiffSynth's training notes say. The dataset is a folder of images with same-name .txt captions
(cat1.png + cat1.txt), or a metadata.csv/.json/.jsonl. The run folder gets checkpoints/, log.csv, loss.png and
lora.safetensors (with alpha and ss_*/modelspec.* metadata; `diffsynth lora convert --to diffusers` writes the
diffusers naming that ZImagePipeline.load_lora_weights reads).
"""

import argparse

import torch

from ds_pipelines import ZImagePipeline, save_image
from ds_train import TrainingConfig, train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="z-image", help="preset, model id or local folder (base, not Turbo)")
parser.add_argument("--data", required=True, help="folder of images + .txt captions, or a metadata file")
parser.add_argument("--output", default="runs/z-image-lora")
parser.add_argument("--trigger", default=None, help="replaces [trigger] in the captions, e.g. 'sks style'")
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--rank", type=int, default=32)
parser.add_argument("--learning-rate", type=float, default=1e-4)
parser.add_argument("--size", type=int, default=1024, help="training resolution (square, a multiple of 16)")
parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16", "no"], help="'no' on a CPU")
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: accelerate's choice)")
args = parser.parse_args()

result = train(
    TrainingConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        mode="lora",  # attention q/k/v/out and the SwiGLU of every main layer, as upstream DiffSynth
        lora_rank=args.rank,
        lora_alpha=args.rank,  # alpha = rank: the LoRA's scale is 1
        trigger_words=(args.trigger,) if args.trigger else (),
        steps=args.steps,
        learning_rate=args.learning_rate,
        height=args.size,
        width=args.size,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=True,  # recompute activations in backward: far less memory, ~30% slower
        cache=True,  # encode captions and images once, then free the text encoder and the VAE
        device=args.device,
        checkpoint_every=250,  # resume=True continues an interrupted run from the newest checkpoint
    )
)
print(f"{result.weights_path}: {result.steps} steps, final loss {result.final_loss:.4f}")

dtype = torch.float32 if args.mixed_precision == "no" else torch.bfloat16
pipe = ZImagePipeline.from_pretrained(args.model, torch_dtype=dtype, device=args.device)
pipe.load_lora(result.weights_path, scale=1.0)
prompt = f"{args.trigger or ''} a red fox in fresh snow".strip()
save_image(pipe(prompt, height=args.size, width=args.size, seed=0), f"{args.output}/sample.png")
