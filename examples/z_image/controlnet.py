"""Z-Image with the Fun ControlNet Union: follow a canny, depth, pose or HED map, or repaint a masked region.

    python examples/z_image/controlnet.py --controlnet Z-Image-Turbo-Fun-Controlnet-Union-2.1-8steps.safetensors \\
        --control-image pose.png --control-type pose --prompt "a dancer on a stage, spotlight"
    python examples/z_image/controlnet.py --controlnet Z-Image-Turbo-Fun-Controlnet-Union-2.1-8steps.safetensors \\
        --control-image photo.png --control-type inpaint --inpaint-mask mask.png --prompt "a bouquet of tulips"

--controlnet is a file of alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union (1.0, 2.0 or 2.1; its version is read from
the file). --control-image is the condition (a map made by your preprocessor of choice: this script does not extract
edges, depth or poses). With --inpaint-mask (white = repaint; 2.x files only) the masked region is redrawn: with
--control-type inpaint the control image is the picture to repaint; with a map type (pose, canny, ...) the picture
is --inpaint-image and the map steers the repainted region. --model takes a preset, a model id or a local folder
laid out like Tongyi-MAI's repositories.
"""

import argparse

import torch
from PIL import Image

from ds_pipelines import ControlNetInput, ZImagePipeline, save_image

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="z-image-turbo", help="preset, model id or local folder")
parser.add_argument("--controlnet", required=True, help="a Z-Image-Turbo-Fun-Controlnet-Union .safetensors file")
parser.add_argument("--control-image", required=True, help="the condition: a canny/depth/pose/HED map, or a picture")
parser.add_argument("--control-type", default=None, help="canny, depth, pose, hed, mlsd, ... or inpaint")
parser.add_argument("--control-scale", type=float, default=1.0, help="ControlNet strength; lower frees the prompt")
parser.add_argument("--control-start", type=float, default=0.0, help="fraction of the schedule where it starts")
parser.add_argument("--control-end", type=float, default=1.0, help="fraction of the schedule where it stops")
parser.add_argument("--inpaint-mask", default=None, help="white = repaint (Union 2.x): inpainting mode")
parser.add_argument("--inpaint-image", default=None, help="the picture to repaint when the control image is a map")
parser.add_argument("--prompt", default="a dancer on a stage, spotlight, photograph")
parser.add_argument("--negative-prompt", default="", help="used only when --cfg-scale is above 1")
parser.add_argument("--output", default="z_image_controlnet.png")
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--steps", type=int, default=None, help="default: the preset's (Turbo 8)")
parser.add_argument("--cfg-scale", type=float, default=None, help="neg + s * (pos - neg); 1 is off (Turbo)")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
args = parser.parse_args()
if args.inpaint_image is not None and args.inpaint_mask is None:
    parser.error("--inpaint-image needs --inpaint-mask (white = repaint)")


def load(path: str, mode: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert(mode)


# The ControlNet file loads beside the model's own components; detection names it "controlnet" and reads its version.
pipe = ZImagePipeline.from_pretrained(
    args.model, model_configs={"controlnet": args.controlnet}, torch_dtype=torch.bfloat16, device=args.device
)
control = ControlNetInput(
    load(args.control_image, "RGB"),  # any size: resized to --width x --height
    scale=args.control_scale,
    start=args.control_start,  # 0 = the first step, 1 = the end of the schedule
    end=args.control_end,
    inpaint_mask=None if args.inpaint_mask is None else load(args.inpaint_mask, "L"),
    inpaint_image=None if args.inpaint_image is None else load(args.inpaint_image, "RGB"),
    control_type=args.control_type,
)
image = pipe(
    args.prompt,
    negative_prompt=args.negative_prompt,
    cfg_scale=args.cfg_scale,
    height=args.height,
    width=args.width,  # multiples of 16 pixels
    num_inference_steps=args.steps,
    seed=args.seed,
    controlnet_inputs=[control],  # several inputs' hints add up
)
save_image(image, args.output)  # the PNG records the ControlNet's type, scale and window
print(args.output)
