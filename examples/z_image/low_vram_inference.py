"""Z-Image-Turbo on a small GPU: weights wait in CPU RAM (or on disk) and stream to the GPU layer by layer.

    python examples/z_image/low_vram_inference.py --vram-limit 4                 # an 8 GB card
    python examples/z_image/low_vram_inference.py --vram-limit 0 --storage disk  # almost no VRAM, little RAM

Each model is moved to the GPU only while a pipeline step uses it (the Qwen3 text encoder, then the DiT, then the
VAE); inside the DiT, the layers that fit in --vram-limit GiB stay resident and the rest are fetched ahead of use.
The DiT stays in bfloat16: FP8 weights degrade Turbo's few-step images noticeably (the pipeline warns if you ask
for them). The text encoder, the largest model after the DiT, is stored in FP8, where it costs nothing visible.
"""

import argparse

import torch

from ds_pipelines import ZImagePipeline, save_image
from ds_vram import VRAMConfig, get_vram_handle

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="z-image-turbo", help="preset, model id or local folder")
parser.add_argument("--prompt", default="a red fox in fresh snow, golden hour")
parser.add_argument("--output", default="z_image_low_vram.png")
parser.add_argument("--vram-limit", type=float, default=4.0, help="GiB of DiT weights kept on the GPU")
parser.add_argument("--storage", choices=["cpu", "disk"], default="cpu", help="where weights wait between uses")
parser.add_argument("--height", type=int, default=1024)
parser.add_argument("--width", type=int, default=1024)
parser.add_argument("--steps", type=int, default=None, help="default: the preset's (Turbo 8)")
parser.add_argument("--device", default=None, help="where layers compute (default: cuda when present)")
args = parser.parse_args()

streamed = dict(storage=args.storage, computation_device=args.device, computation_dtype=torch.bfloat16)
vram = {
    "dit": VRAMConfig(**streamed, vram_limit=args.vram_limit),  # bfloat16 storage: Turbo keeps its quality
    "text_encoder": VRAMConfig(**streamed, storage_dtype="fp8"),  # e4m3fn with a scale per output channel
    "vae": VRAMConfig(**streamed),
}
pipe = ZImagePipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, device=args.device, vram=vram)
image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps, seed=0)
save_image(image, args.output)
print(args.output)
report = get_vram_handle(pipe.dit).report()  # str(report) is the per-layer table
print(f"DiT: {report.resident_bytes / 2**30:.2f} GiB resident, {report.streamed_bytes / 2**30:.2f} GiB streamed")
