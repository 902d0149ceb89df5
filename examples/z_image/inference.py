"""Z-Image text-to-image: load a model, generate one image, save it as a PNG with its parameters.

    python examples/z_image/inference.py --prompt "a red fox in fresh snow, golden hour"
    python examples/z_image/inference.py --model z-image --steps 50 --cfg-scale 4 --negative-prompt "blurry"

--model takes a preset (z-image-turbo, z-image), a model id, or a local folder laid out like Tongyi-MAI's
repositories (transformer/, text_encoder/, tokenizer/, vae/). Presets download from ModelScope into ./models on
first use. Unset options take the preset's values: Turbo runs 8 steps without CFG, base 50 steps at cfg 4.
"""

import argparse

import torch

from ds_pipelines import ZImagePipeline, save_image

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="z-image-turbo", help="preset, model id or local folder")
parser.add_argument("--prompt", default="a red fox in fresh snow, golden hour")
parser.add_argument("--negative-prompt", default="", help="used only when --cfg-scale is above 1")
parser.add_argument("--output", default="z_image.png")
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--steps", type=int, default=None, help="default: the preset's (Turbo 8, base 50)")
parser.add_argument("--cfg-scale", type=float, default=None, help="neg + s * (pos - neg); 1 is off (Turbo)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
args = parser.parse_args()

# bfloat16 halves the memory of float32 and is what Z-Image was trained in.
pipe = ZImagePipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, device=args.device)
image = pipe(
    args.prompt,
    negative_prompt=args.negative_prompt,
    cfg_scale=args.cfg_scale,
    height=args.height,
    width=args.width,  # multiples of 16 pixels
    num_inference_steps=args.steps,
    seed=args.seed,  # the same seed gives the same image on any machine (noise is drawn on the CPU)
)
save_image(image, args.output)  # PNG with a "parameters" chunk other tools read
print(args.output)
