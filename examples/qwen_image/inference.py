"""Qwen-Image text to image: the 20B MMDiT, strong at rendering text, with the official true CFG.

    python examples/qwen_image/inference.py --prompt 'a shop sign that reads "OPEN 24 HOURS", neon, night'
    python examples/qwen_image/inference.py --model qwen-image-2512 --height 928 --width 1664

--model takes a preset (qwen-image, qwen-image-2512), a model id or a local folder laid out like Qwen's repositories
(transformer/, text_encoder/, tokenizer/, vae/). The preset samples 50 steps at cfg_scale 4: the guided velocity is
rescaled per token to the conditional one's norm, as the official pipeline and diffusers do.
"""

import argparse

import torch

from ds_pipelines import QwenImagePipeline, save_image

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="qwen-image", help="preset, model id or local folder")
parser.add_argument("--prompt", default='a coffee shop entrance with a chalkboard sign that reads "Qwen Coffee"')
parser.add_argument("--negative-prompt", default="", help="used when --cfg-scale is above 1")
parser.add_argument("--output", default="qwen_image.png")
parser.add_argument("--height", type=int, default=None, help="default: the preset's (1328)")
parser.add_argument("--width", type=int, default=None, help="default: the preset's (1328)")
parser.add_argument("--steps", type=int, default=None, help="default: the preset's (50)")
parser.add_argument("--cfg-scale", type=float, default=None, help="true CFG scale; 1 is off (default: 4)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
args = parser.parse_args()

pipe = QwenImagePipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, device=args.device)
image = pipe(
    args.prompt,
    negative_prompt=args.negative_prompt,
    cfg_scale=args.cfg_scale,
    height=args.height,
    width=args.width,  # multiples of 16 pixels
    num_inference_steps=args.steps,
    seed=args.seed,  # noise drawn on the CPU in float32: the same image on any machine
)
save_image(image, args.output)  # the PNG keeps the generation parameters
print(args.output)
