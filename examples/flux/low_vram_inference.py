"""FLUX.1 on a small GPU: weights stored in FP8 in CPU RAM (or read from disk), streamed to the GPU layer by layer.

    python examples/flux/low_vram_inference.py --vram-limit 6          # an 8 GB card
    python examples/flux/low_vram_inference.py --vram-limit 0 --storage disk   # almost no VRAM, little RAM

Each model is moved to the GPU only while a pipeline step uses it (text encoders, then the DiT, then the VAE);
inside the DiT, the layers that fit in --vram-limit GiB stay resident and the rest are fetched ahead of use.
See docs/vram.md for the measured cost of each setting.
"""

import argparse

import torch

from ds_pipelines import FluxImagePipeline, save_image
from ds_vram import VRAMConfig, get_vram_handle

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="flux.1-dev", help="preset, model id or local folder")
parser.add_argument("--prompt", default="a lighthouse at dawn, oil painting")
parser.add_argument("--output", default="flux_low_vram.png")
parser.add_argument("--vram-limit", type=float, default=6.0, help="GiB of weights kept on the GPU")
parser.add_argument("--storage", choices=["cpu", "disk"], default="cpu", help="where weights wait between uses")
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--device", default=None, help="where layers compute (default: cuda when present)")
args = parser.parse_args()

vram = VRAMConfig(
    storage=args.storage,
    storage_dtype="fp8",  # e4m3fn with a scale per output channel: half the bytes of bf16
    computation_device=args.device,
    computation_dtype=torch.bfloat16,
    vram_limit=args.vram_limit,
)
pipe = FluxImagePipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, device=args.device, vram=vram)
image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps, seed=0)
save_image(image, args.output)
print(args.output)
report = get_vram_handle(pipe.dit).report()  # str(report) is the per-layer table
print(f"DiT: {report.resident_bytes / 2**30:.2f} GiB resident, {report.streamed_bytes / 2**30:.2f} GiB streamed")
