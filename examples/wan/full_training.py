"""Fine-tune every weight of a Wan DiT (umT5, CLIP and the VAE stay frozen).

    python examples/wan/full_training.py --data my_clips --steps 2000
    accelerate launch --config_file fsdp.yaml examples/wan/full_training.py --model wan2.1-t2v-14b --data my_clips

The 1.3B DiT in full needs its weights, gradients and AdamW state (about 23 GB in float32) plus activations: one
80 GB GPU with gradient checkpointing. The 14B models need several GPUs with FSDP (accelerate's config). The run
folder gets dit.safetensors with the official Wan key names, which loads wherever the released DiT does.
"""

import argparse

import torch

from ds_pipelines import WanVideoPipeline, save_video
from ds_train import TrainingConfig, train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="wan2.1-t2v-1.3b", help="preset, model id or local folder")
parser.add_argument("--data", required=True, help="folder of clips/images + .txt captions, or a metadata file")
parser.add_argument("--output", default="runs/wan-full")
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--batch-size", type=int, default=1)
parser.add_argument("--learning-rate", type=float, default=1e-5)
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=832)
parser.add_argument("--frames", type=int, default=81, help="4k+1 frames per clip")
parser.add_argument("--prompt", default="a red fox running through snow", help="the test video's prompt")
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
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=True,
        cache=True,
        device=args.device,
        checkpoint_every=500,
    )
)
print(f"{result.weights_path}: {result.steps} steps, final loss {result.final_loss:.4f}")

# The trained DiT replaces the model's; umT5, its tokenizer and the VAE come from the base model.
dtype = torch.float32 if args.mixed_precision == "no" else torch.bfloat16
pipe = WanVideoPipeline.from_pretrained(
    args.model, model_configs={"dit": result.weights_path}, torch_dtype=dtype, device=args.device
)
video = pipe(args.prompt, height=args.height, width=args.width, num_frames=args.frames, seed=0)
save_video(video, f"{args.output}/sample.mp4")
