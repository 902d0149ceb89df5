"""FLUX.1 text-to-image: load a model, generate one image, save it as a PNG with its parameters.

    python examples/flux/inference.py --prompt "a lighthouse at dawn, oil painting"
    python examples/flux/inference.py --model ./FLUX.1-dev --steps 30 --output lighthouse.png

--model takes a preset (flux.1-dev, flux.1-schnell, flux.1-krea-dev, ...), a model id, or a local folder laid out
like the official repository. Presets download from ModelScope into ./models on first use.
"""

import argparse

import torch

from ds_pipelines import FluxImagePipeline, save_image

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="flux.1-dev", help="preset, model id or local folder")
parser.add_argument("--prompt", default="a lighthouse at dawn, oil painting")
parser.add_argument("--output", default="flux.png")
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
args = parser.parse_args()

# bfloat16 halves the memory of float32 and is what FLUX.1 was trained in.
pipe = FluxImagePipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, device=args.device)
image = pipe(
    args.prompt,
    embedded_guidance=3.5,  # FLUX.1-dev's distilled guidance; schnell ignores it
    height=args.height,
    width=args.width,
    num_inference_steps=args.steps,
    seed=args.seed,  # the same seed gives the same image on any machine (noise is drawn on the CPU)
)
save_image(image, args.output)  # PNG with a "parameters" chunk other tools read
print(args.output)
