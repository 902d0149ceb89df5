"""Qwen-Image-Edit: change an image (or combine several) by instruction.

    python examples/qwen_image/edit.py --edit-image cat.png --prompt "make the cat wear a red scarf"
    python examples/qwen_image/edit.py --edit-image person.png --edit-image dress.png \\
        --prompt "the person in picture 1 wears the dress of picture 2"

--model: qwen-image-edit-2509 (default; one to three images), qwen-image-edit-2511 (its DiT runs the reference
tokens at t = 0) or qwen-image-edit (the original model: one image). Each edit image is seen twice: by Qwen2.5-VL
with the instruction (labelled "Picture 1:", "Picture 2:" ... for 2509/2511), and as clean VAE latents that follow the
target's tokens in the DiT. Without --height/--width the output takes the last edit image's aspect ratio at about
one megapixel.
"""

import argparse

import torch
from PIL import Image

from ds_pipelines import QwenImagePipeline, save_image

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="qwen-image-edit-2509", help="preset, model id or local folder")
parser.add_argument("--edit-image", action="append", required=True, help="an image to edit (repeatable)")
parser.add_argument("--prompt", default="turn it into a watercolour painting")
parser.add_argument("--output", default="qwen_image_edit.png")
parser.add_argument("--height", type=int, default=None, help="default: the last edit image's aspect at ~1 MP")
parser.add_argument("--width", type=int, default=None)
parser.add_argument("--steps", type=int, default=None, help="default: the preset's (40; 50 for qwen-image-edit)")
parser.add_argument("--cfg-scale", type=float, default=None, help="true CFG scale; 1 is off (default: 4)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
args = parser.parse_args()

images = []
for path in args.edit_image:
    with Image.open(path) as image:
        images.append(image.convert("RGB"))

pipe = QwenImagePipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, device=args.device)
image = pipe(
    args.prompt,
    edit_image=images if len(images) > 1 else images[0],
    height=args.height,
    width=args.width,
    num_inference_steps=args.steps,
    cfg_scale=args.cfg_scale,  # the negative prompt ("") is encoded with the same edit images
    seed=args.seed,
)
save_image(image, args.output)
print(args.output)
