"""Wan image-to-video: animate a still image following a prompt; the video starts from the image.

    python examples/wan/image_to_video.py --image photo.jpg --prompt "the camera slowly pushes in"
    python examples/wan/image_to_video.py --model wan2.2-ti2v-5b --image photo.jpg --height 704 --width 1280

Image-to-video models: wan2.1-i2v-14b-480p / -720p and wan2.2-i2v-a14b (the image conditions every frame), and
wan2.2-ti2v-5b (the image becomes the first frame). The image is resized to --width x --height.
"""

import argparse

import torch
from PIL import Image

from ds_pipelines import WanVideoPipeline, save_video

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="wan2.1-i2v-14b-480p", help="preset, model id or local folder")
parser.add_argument("--image", required=True, help="the first frame")
parser.add_argument("--prompt", default="the camera slowly pushes in, gentle wind")
parser.add_argument("--output", default="wan_i2v.mp4")
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=832)
parser.add_argument("--frames", type=int, default=81)
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None)
args = parser.parse_args()

pipe = WanVideoPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, device=args.device)
video = pipe(
    args.prompt,
    input_image=Image.open(args.image).convert("RGB"),
    height=args.height,
    width=args.width,
    num_frames=args.frames,
    num_inference_steps=args.steps,
    seed=args.seed,
)
save_video(video, args.output)
print(args.output)
