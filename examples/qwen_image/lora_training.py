"""Train a Qwen-Image LoRA (text to image, or editing), then generate with it.

    python examples/qwen_image/lora_training.py --data my_dataset --trigger "sks style" --steps 1000
    python examples/qwen_image/lora_training.py --model qwen-image-edit-2509 --data my_edits/metadata.jsonl
    accelerate launch examples/qwen_image/lora_training.py --data my_dataset   # several GPUs

Text to image: a folder of images with same-name .txt captions (cat1.png + cat1.txt), or a metadata.csv/.json/.jsonl
with image and prompt columns. Editing (an Edit model): a metadata table whose rows also name the edit image(s):
{"image": "after.png", "edit_image": ["before.png", "style.png"], "prompt": "paint it in the style of picture 2"}
(or columns edit_image, edit_image_2, ...); the instruction is seen with the edit images, as at sampling. The LoRA
targets DiffSynth-Studio's twelve layers of every block; the run folder gets checkpoints/, log.csv, loss.png and
lora.safetensors (`diffsynth lora convert --to diffusers` writes the naming diffusers' load_lora_weights reads).
"""

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from ds_pipelines import QwenImagePipeline, save_image
from ds_train import TrainingConfig, train

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="qwen-image", help="preset, model id or local folder")
parser.add_argument("--data", required=True, help="folder of images + .txt captions, or a metadata file")
parser.add_argument("--output", default="runs/qwen-image-lora")
parser.add_argument("--trigger", default=None, help="replaces [trigger] in the captions, e.g. 'sks style'")
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--rank", type=int, default=32)
parser.add_argument("--learning-rate", type=float, default=1e-4)
parser.add_argument("--size", type=int, default=1024, help="training resolution (square, a multiple of 16)")
parser.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp16", "no"], help="'no' on a CPU")
parser.add_argument("--fp8", action="store_true", help="store the frozen DiT in FP8 (a 24-48 GB GPU)")
parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: accelerate's choice)")
args = parser.parse_args()

result = train(
    TrainingConfig(
        model=args.model,
        data=args.data,
        output=args.output,
        mode="lora",
        lora_rank=args.rank,
        lora_alpha=args.rank,  # alpha = rank: the LoRA's scale is 1
        trigger_words=(args.trigger,) if args.trigger else (),
        steps=args.steps,
        learning_rate=args.learning_rate,
        height=args.size,
        width=args.size,
        mixed_precision=args.mixed_precision,
        fp8_frozen=args.fp8,
        gradient_checkpointing=True,  # recompute activations in backward: far less memory, ~30% slower
        cache=True,  # encode prompts, images and edit images once, then free the text encoder and the VAE
        device=args.device,
        checkpoint_every=250,  # resume=True continues an interrupted run from the newest checkpoint
    )
)
print(f"{result.weights_path}: {result.steps} steps, final loss {result.final_loss:.4f}")

dtype = torch.float32 if args.mixed_precision == "no" else torch.bfloat16
pipe = QwenImagePipeline.from_pretrained(args.model, torch_dtype=dtype, device=args.device)
pipe.load_lora(result.weights_path, scale=1.0)
prompt = f"{args.trigger or ''} a red fox in fresh snow".strip()
options = dict(height=args.size, width=args.size, seed=0)
data = Path(args.data)
if data.suffix == ".jsonl":  # an edit dataset: edit its first row's image(s) with a new instruction
    row = json.loads(data.read_text().splitlines()[0])
    names = row["edit_image"] if isinstance(row["edit_image"], list) else [row["edit_image"]]
    options["edit_image"] = [Image.open(data.parent / name).convert("RGB") for name in names]
save_image(pipe(prompt, **options), f"{args.output}/sample.png")
