"""Train a Wan LoRA on a folder of video clips (and images), then generate a video with it.

    python examples/wan/lora_training.py --data my_clips --steps 1000
    python examples/wan/lora_training.py --model wan2.2-t2v-a14b --expert low_noise --data my_clips
    accelerate launch examples/wan/lora_training.py --data my_clips   # several GPUs (accelerate config)

The dataset is a folder of .mp4/.mov/.webm clips and images with same-name .txt captions (walk.mp4 + walk.txt), or a
metadata.csv/.json/.jsonl with file names and captions. Each clip gives its first --frames frames (a shorter one the
longest 4k+1 it holds); an image is a one-frame clip. A 30 fps source moves like Wan's 16 fps with --frame-stride 2.
Wan2.2 A14B has two experts: train the high-noise one (layout and motion) and the low-noise one (detail) in two
runs, and load each LoRA with pipe.load_lora(path, expert=...). The run folder gets checkpoints/, log.csv,
loss.png and lora.safetensors (ComfyUI format: it loads in ComfyUI, diffusers and musubi-tuner style tools too).
"""

import argparse

import torch

from ds_pipelines import WanVideoPipeline, save_video
from ds_train import TrainingConfig, train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="wan2.1-t2v-1.3b", help="preset, model id or local folder")
parser.add_argument("--expert", default=None, choices=["high_noise", "low_noise"], help="Wan2.2 A14B only")
parser.add_argument("--data", required=True, help="folder of clips/images + .txt captions, or a metadata file")
parser.add_argument("--output", default="runs/wan-lora")
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--rank", type=int, default=32)
parser.add_argument("--learning-rate", type=float, default=1e-4)
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=832)
parser.add_argument("--frames", type=int, default=49, help="4k+1 frames per clip (81 is the released length)")
parser.add_argument("--frame-stride", type=int, default=1, help="take every n-th frame of each clip")
parser.add_argument("--prompt", default="a red fox running through snow", help="the test video's prompt")
parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16", "no"], help="'no' on a CPU")
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: accelerate's choice)")
args = parser.parse_args()

result = train(
    TrainingConfig(
        model=args.model,
        family_options={"expert": args.expert},  # Wan2.2 A14B: which expert (None: a single-DiT model)
        data=args.data,
        output=args.output,
        mode="lora",
        lora_rank=args.rank,
        lora_alpha=args.rank,  # alpha = rank: the LoRA's scale is 1
        steps=args.steps,
        learning_rate=args.learning_rate,
        height=args.height,
        width=args.width,
        num_frames=args.frames,
        frame_stride=args.frame_stride,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=True,  # a 49-frame 480p clip is ~16k tokens: recompute activations in backward
        cache=True,  # encode captions and clips once, then free umT5 and the VAE
        device=args.device,
        checkpoint_every=250,  # resume=True continues an interrupted run from the newest checkpoint
    )
)
print(f"{result.weights_path}: {result.steps} steps, final loss {result.final_loss:.4f}")

dtype = torch.float32 if args.mixed_precision == "no" else torch.bfloat16
pipe = WanVideoPipeline.from_pretrained(args.model, torch_dtype=dtype, device=args.device)
pipe.load_lora(result.weights_path, expert=args.expert or "all")
video = pipe(args.prompt, height=args.height, width=args.width, num_frames=args.frames, seed=0)
save_video(video, f"{args.output}/sample.mp4")
