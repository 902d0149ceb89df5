"""Wan text-to-video: a prompt in, an mp4 out (at the model's native frame rate, with its parameters inside).

    python examples/wan/text_to_video.py --prompt "a red fox running through snow, cinematic"
    python examples/wan/text_to_video.py --model wan2.1-t2v-14b --height 720 --width 1280

--model takes a preset (wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.2-t2v-a14b, wan2.2-ti2v-5b, ...), a model id, or a
local folder laid out like the Wan-AI or diffusers repository. Presets download from ModelScope into ./models.
"""

import argparse

import torch

from ds_pipelines import WanVideoPipeline, save_video

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="wan2.1-t2v-1.3b", help="preset, model id or local folder")
parser.add_argument("--prompt", default="a red fox running through snow, cinematic")
parser.add_argument("--negative-prompt", default="blurry, low quality, static, distorted")
parser.add_argument("--output", default="wan_t2v.mp4")
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=832)
parser.add_argument("--frames", type=int, default=81, help="4k+1 frames: 81 is 5 seconds at 16 fps")
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
args = parser.parse_args()

pipe = WanVideoPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, device=args.device)
video = pipe(
    args.prompt,
    negative_prompt=args.negative_prompt,
    cfg_scale=5.0,  # classifier-free guidance: two DiT passes per step
    height=args.height,
    width=args.width,
    num_frames=args.frames,
    num_inference_steps=args.steps,
    seed=args.seed,
)
save_video(video, args.output)  # H.264 mp4 at pipe.fps (16; 24 for Wan2.2-TI2V-5B)
print(args.output)
