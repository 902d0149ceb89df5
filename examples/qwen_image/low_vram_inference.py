"""Qwen-Image on a small GPU: the 20B DiT stored in FP8 in CPU RAM (or read from disk) and streamed layer by layer.

    python examples/qwen_image/low_vram_inference.py --vram-limit 8                 # a 12-16 GB card
    python examples/qwen_image/low_vram_inference.py --vram-limit 0 --storage disk  # little VRAM, little RAM

Each model is moved to the GPU only while a pipeline step uses it (Qwen2.5-VL, then the DiT, then the VAE). Inside
the DiT, the layers that fit in --vram-limit GiB stay resident and the rest are fetched ahead of use. FP8 storage
(e4m3fn with a scale per output channel, computed in bfloat16) halves the DiT's 41 GB and the text encoder's 16 GB;
the DiT's embedders and output layers stay bfloat16. No model code changes: ds-vram manages the layers from outside.
"""

import argparse

import torch

from ds_pipelines import QwenImagePipeline, save_image
from ds_vram import VRAMConfig, get_vram_handle

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="qwen-image", help="preset, model id or local folder")
parser.add_argument("--prompt", default='a poster that reads "LOW VRAM, HIGH HOPES", bold letters')
parser.add_argument("--output", default="qwen_image_low_vram.png")
parser.add_argument("--vram-limit", type=float, default=8.0, help="GiB of DiT weights kept on the GPU")
parser.add_argument("--storage", choices=["cpu", "disk"], default="cpu", help="where weights wait between uses")
parser.add_argument("--height", type=int, default=1328)
parser.add_argument("--width", type=int, default=1328)
parser.add_argument("--steps", type=int, default=None, help="default: the preset's (50)")
parser.add_argument("--device", default=None, help="where layers compute (default: cuda when present)")
args = parser.parse_args()

streamed = dict(storage=args.storage, computation_device=args.device, computation_dtype=torch.bfloat16)
vram = {
    "dit": VRAMConfig(**streamed, storage_dtype="fp8", vram_limit=args.vram_limit),
    "text_encoder": VRAMConfig(**streamed, storage_dtype="fp8"),
    "vae": VRAMConfig(**streamed),
}
pipe = QwenImagePipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16, device=args.device, vram=vram)
image = pipe(args.prompt, height=args.height, width=args.width, num_inference_steps=args.steps, seed=0)
save_image(image, args.output)
print(args.output)
report = get_vram_handle(pipe.dit).report()  # str(report) is the per-layer table
print(f"DiT: {report.resident_bytes / 2**30:.2f} GiB resident, {report.streamed_bytes / 2**30:.2f} GiB streamed")
