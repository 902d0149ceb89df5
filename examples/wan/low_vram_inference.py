"""Wan 14B on a 12-16 GB card: the DiT stored in FP8 in CPU RAM and streamed, the VAE decoding in tiles.

    python examples/wan/low_vram_inference.py --vram-limit 8
    python examples/wan/low_vram_inference.py --model wan2.2-t2v-a14b --vram-limit 4 --storage disk

The umT5 encoder runs once per prompt, then leaves the GPU; the DiT keeps --vram-limit GiB of FP8 weights
resident and fetches the rest ahead of use; the VAE decodes tile by tile (tiled=True, the default).
`diffsynth vram --model MODEL --gpu-memory GIB --frames N` suggests a --vram-limit for your card.
"""

import argparse

import torch

from ds_pipelines import WanVideoPipeline, save_video
from ds_vram import VRAMConfig

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="wan2.1-t2v-14b", help="preset, model id or local folder")
parser.add_argument("--prompt", default="a lighthouse in a storm, waves crashing, cinematic")
parser.add_argument("--output", default="wan_low_vram.mp4")
parser.add_argument("--vram-limit", type=float, default=8.0, help="GiB of DiT weights kept on the GPU")
parser.add_argument("--storage", choices=["cpu", "disk"], default="cpu", help="where weights wait between uses")
parser.add_argument("--height", type=int, default=480)
parser.add_argument("--width", type=int, default=832)
parser.add_argument("--frames", type=int, default=81)
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--device", default=None)
args = parser.parse_args()

offload = VRAMConfig(storage=args.storage, computation_device=args.device)  # on the GPU only while used
dit = VRAMConfig(storage=args.storage, storage_dtype="fp8", computation_device=args.device, vram_limit=args.vram_limit)
pipe = WanVideoPipeline.from_pretrained(
    args.model,
    torch_dtype=torch.bfloat16,
    device=args.device,
    vram={"text_encoder": offload, "image_encoder": offload, "vae": offload, "dit": dit, "dit2": dit},
)
video = pipe(
    args.prompt,
    height=args.height,
    width=args.width,
    num_frames=args.frames,
    num_inference_steps=args.steps,
    seed=0,
    tiled=True,
)
save_video(video, args.output)
print(args.output)
