"""Qwen-Image with DiffSynth-Studio's blockwise ControlNets: follow a canny or depth map, or repaint a masked region.

    python examples/qwen_image/controlnet.py --controlnet Qwen-Image-Blockwise-ControlNet-Canny/model.safetensors \\
        --control-image edges.png --prompt "a glass house in a forest"
    python examples/qwen_image/controlnet.py --controlnet Qwen-Image-Blockwise-ControlNet-Inpaint/model.safetensors \\
        --control-image photo.png --inpaint-mask mask.png --prompt "a bouquet of tulips on the table"

--controlnet is the model.safetensors of DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-{Canny,Depth,Inpaint} (or
InstantX/Qwen-Image-ControlNet-Union's file); its kind is read from the file. --control-image is the map (this script
does not extract edges or depth) or, with --inpaint-mask (white = repaint; the Inpaint model), the picture to repaint.
"""

import argparse

import torch
from PIL import Image

from ds_pipelines import ControlNetInput, QwenImagePipeline, save_image

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="qwen-image", help="preset, model id or local folder")
parser.add_argument("--controlnet", required=True, help="a Qwen-Image ControlNet .safetensors file")
parser.add_argument("--control-image", required=True, help="a canny/depth map, or the picture to repaint")
parser.add_argument("--inpaint-mask", default=None, help="white = repaint (the Inpaint ControlNet)")
parser.add_argument("--control-scale", type=float, default=1.0, help="ControlNet strength; lower frees the prompt")
parser.add_argument("--control-start", type=float, default=0.0, help="fraction of the schedule where it starts")
parser.add_argument("--control-end", type=float, default=1.0, help="fraction of the schedule where it stops")
parser.add_argument("--prompt", default="a glass house in a pine forest, morning light, photograph")
parser.add_argument("--output", default="qwen_image_controlnet.png")
parser.add_argument("--height", type=int, default=1328)
parser.add_argument("--width", type=int, default=1328)
parser.add_argument("--steps", type=int, default=None, help="default: the preset's (50)")
parser.add_argument("--cfg-scale", type=float, default=None, help="true CFG scale; 1 is off (default: 4)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
args = parser.parse_args()


def load(path: str, mode: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert(mode)


# The ControlNet file loads beside the model's own components; detection tells blockwise from InstantX Union.
pipe = QwenImagePipeline.from_pretrained(
    args.model, model_configs={"controlnet": args.controlnet}, torch_dtype=torch.bfloat16, device=args.device
)
mask = None if args.inpaint_mask is None else load(args.inpaint_mask, "L")
control = ControlNetInput(
    load(args.control_image, "RGB"),  # any size: resized to --width x --height
    scale=args.control_scale,
    start=args.control_start,  # 0 = the first step, 1 = the end of the schedule
    end=args.control_end,
    inpaint_mask=mask,
    control_type="inpaint" if mask is not None else None,
)
image = pipe(
    args.prompt,
    height=args.height,
    width=args.width,
    num_inference_steps=args.steps,
    cfg_scale=args.cfg_scale,
    seed=args.seed,
    controlnet_inputs=[control],
)
save_image(image, args.output)
print(args.output)
