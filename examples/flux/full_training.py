"""Fine-tune every weight of the FLUX.1 DiT (the text encoders and the VAE stay frozen).

    python examples/flux/full_training.py --data my_dataset --steps 2000
    accelerate launch --config_file fsdp.yaml examples/flux/full_training.py --data my_dataset   # shard over GPUs

A 12B DiT trained in full needs its weights, gradients and AdamW state: about 190 GB in float32, so in practice
several GPUs with FSDP (accelerate's config) or DeepSpeed. The run folder gets dit.safetensors with the BFL key
names, which loads wherever flux1-dev.safetensors does.
"""

import argparse

import torch

from ds_pipelines import FluxImagePipeline, save_image
from ds_train import TrainingConfig, train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="flux.1-dev", help="preset, model id or local folder")
parser.add_argument("--data", required=True, help="folder of images + .txt captions, or a metadata file")
parser.add_argument("--output", default="runs/flux-full")
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--learning-rate", type=float, default=1e-5)
parser.add_argument("--size", type=int, default=1024, help="training resolution (square)")
parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16", "no"], help="'no' on a CPU")
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: accelerate's choice)")
args = parser.parse_args()

result = train(
    TrainingConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        mode="full",
        trainable=("dit",),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler="cosine",
        lr_warmup_steps=min(100, args.steps // 10),
        height=args.size,
        width=args.size,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=True,
        cache=True,
        device=args.device,
        checkpoint_every=500,
    )
)
print(f"{result.weights_path}: {result.steps} steps, final loss {result.final_loss:.4f}")

# The trained DiT replaces the preset's; the text encoders, tokenizers and VAE come from the base model.
dtype = torch.float32 if args.mixed_precision == "no" else torch.bfloat16
pipe = FluxImagePipeline.from_pretrained(
    args.model, model_configs={"dit": result.weights_path}, torch_dtype=dtype, device=args.device
)
save_image(pipe("a lighthouse at dawn", height=args.size, width=args.size, seed=0), f"{args.output}/sample.png")
