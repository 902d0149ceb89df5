"""``diffsynth generate``: images (FLUX.1) and videos (Wan) from a preset, a model id, a folder or files."""

from __future__ import annotations

import argparse
import inspect
import json
from pathlib import Path

from ds_cli import options as types
from ds_cli.common import UsageError, formatter, free_paths

EXAMPLES = """examples:
  diffsynth generate --prompt "a handwritten digit 7" -o seven.png          # built-in demo model, offline
  diffsynth generate --prompt "a handwritten digit 3" -o three.png --count 4 --seed 10   # seeds 10..13
  diffsynth generate --model flux.1-dev --prompt "a lighthouse at dawn" -o lighthouse.png
  diffsynth generate --model ./FLUX.1-schnell --prompt "a cat" --steps 4 --vram-limit 6 --fp8
  diffsynth generate --model flux.1-dev --prompt "ink style" --lora ink.safetensors:0.8 --lora paper.safetensors
  diffsynth generate --model flux.1-dev --prompt "in winter" --input-image summer.png --strength 0.6
  diffsynth generate --model wan2.1-t2v-1.3b --prompt "waves at night" -o waves.mp4 --frames 33 --storage disk
  diffsynth generate --model z-image-turbo --prompt "a dancer" --controlnet union-2.1-8steps.safetensors \\
      --control-image pose.png --control-type pose --control-scale 0.9
  diffsynth generate --model qwen-image-edit-2509 --prompt "the cat from Picture 1 on the sofa of Picture 2" \\
      --edit-image cat.png --edit-image sofa.png -o cat-on-sofa.png
  diffsynth generate --model qwen-image --prompt "a lighthouse" --controlnet canny-blockwise.safetensors \\
      --control-image edges.png
  diffsynth generate --model qwen-image --prompt "a red door" --input-image house.png --inpaint-mask door.png
  diffsynth generate --model qwen-image --prompt "a red door" --controlnet inpaint-blockwise.safetensors \\
      --control-image house.png --control-type inpaint --inpaint-mask door.png

Output files are never overwritten unless --overwrite: seven.png exists, so the next one is seven-1.png.
Every file carries its parameters (PNG text chunks "parameters" and "diffsynth"; the mp4 "comment" tag).
"""

DTYPES = ("bf16", "fp16", "fp32")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="generate images or videos from a prompt", epilog=EXAMPLES, **formatter()
    )
    parser.add_argument(
        "--model", help="preset (flux.1-dev, wan2.1-t2v-1.3b), model id, local folder or file (default: demo-digits)"
    )
    parser.add_argument("--prompt", required=True, type=types.utf8_text)
    parser.add_argument("--negative-prompt", default="", type=types.utf8_text)
    parser.add_argument("-o", "--output", type=Path, help="a .png (images) or .mp4 (videos); default output.png/.mp4")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files instead of numbering")
    parser.add_argument(
        "--count", type=types.positive_int, default=1, help="how many to make, seeds counting up from --seed"
    )
    parser.add_argument("--seed", type=types.seed_int, default=0, help="in [0, 2**64-1] (default: 0)")
    parser.add_argument("--steps", type=types.positive_int, help="sampling steps (default: the model's)")
    parser.add_argument("--height", type=types.positive_int, help="pixels, a multiple of 16 (default: the model's)")
    parser.add_argument("--width", type=types.positive_int, help="pixels, a multiple of 16 (default: the model's)")
    parser.add_argument("--frames", type=types.positive_int, help="video frames, 4k+1 (default: the model's)")
    parser.add_argument("--fps", type=types.positive_float, help="video frame rate (default: the model's native rate)")
    parser.add_argument(
        "--cfg-scale", type=types.finite_float, help="classifier-free guidance (1: off; default: the model's)"
    )
    parser.add_argument("--guidance", type=types.finite_float, help="FLUX.1 embedded guidance (dev: 3.5)")
    parser.add_argument("--sigma-shift", type=types.positive_float, help="flow-matching shift (default: the model's)")
    parser.add_argument("--input-image", type=Path, help="start from this image (image-to-image, image-to-video)")
    parser.add_argument("--input-video", type=Path, help="start from this video (video-to-video)")
    parser.add_argument(
        "--strength", type=types.strength, default=1.0, help="denoising strength with an input, in (0, 1]"
    )
    parser.add_argument(
        "--lora",
        action="append",
        type=types.lora_spec,
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA (repeatable)",
    )
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when present)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="computation dtype (default: bf16 on a GPU, fp32 on a CPU, where bf16 is slow)"
    )
    parser.add_argument(
        "--vram-limit", type=types.non_negative_float, help="GiB of weights kept on the GPU; the rest is streamed"
    )
    parser.add_argument("--fp8", action="store_true", help="store weights in FP8 (e4m3fn, per-channel scales)")
    parser.add_argument(
        "--storage",
        choices=("device", "cpu", "disk"),
        help="where weights sit between uses (default: cpu with --vram-limit or --fp8, else the device)",
    )
    parser.add_argument("--tiled", action="store_true", help="tiled VAE encode and decode (less memory)")
    parser.add_argument(
        "--edit-image",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="an image to edit (repeatable: Qwen-Image-Edit-2509/2511 and Z-Image Omni-Base take several); without "
        "--height/--width the output takes the last one's aspect ratio",
    )
    parser.add_argument(
        "--controlnet",
        type=Path,
        help="a ControlNet file to load beside the model (Z-Image Fun Union, Qwen-Image blockwise or InstantX Union)",
    )
    parser.add_argument("--control-image", type=Path, help="the ControlNet's condition (a canny, depth or pose map)")
    parser.add_argument("--control-type", help="what the control image is: canny, depth, pose, hed, ...")
    parser.add_argument(
        "--control-scale", type=types.finite_float, default=1.0, help="ControlNet strength (default 1)"
    )
    parser.add_argument(
        "--inpaint-mask",
        type=Path,
        metavar="FILE",
        help="an image, white = repaint: with --input-image only the masked part changes (pipelines that inpaint); "
        "with --control-type inpaint it is the inpainting ControlNet's mask over --control-image",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _vram_config(args: argparse.Namespace, dtype: object) -> object | None:
    if args.vram_limit is None and not args.fp8 and args.storage is None:
        return None
    from ds_pipelines import VRAMConfig

    if args.vram_limit is not None and args.storage == "device":
        raise UsageError("--vram-limit streams weights from CPU RAM or disk; use --storage cpu or disk with it")
    return VRAMConfig(
        storage=args.storage or "cpu",
        storage_dtype="fp8" if args.fp8 else None,
        computation_device=args.device,
        computation_dtype=dtype,
        vram_limit=args.vram_limit,
    )


def _check(args: argparse.Namespace, kind: str) -> Path:
    """Usage errors before anything loads; returns the output path."""
    suffix = ".mp4" if kind == "video" else ".png"
    output = args.output or Path(f"output{suffix}")
    if output.suffix.lower() != suffix:
        what = "videos are written as mp4" if kind == "video" else "images are written as PNG"
        raise UsageError(f"--output {output}: {what}; use a {suffix} name")
    if args.seed + args.count - 1 > types.MAX_SEED:
        raise UsageError(
            f"--seed {args.seed} --count {args.count}: the last seed would be {args.seed + args.count - 1}, over "
            f"{types.MAX_SEED} (2**64 - 1, the largest seed torch.Generator takes)"
        )
    if args.strength != 1 and args.input_image is None and args.input_video is None:
        raise UsageError("--strength needs --input-image or --input-video to start from")
    if args.control_image is None and (args.control_type is not None or args.control_scale != 1):
        raise UsageError("--control-type and --control-scale need --control-image")
    if _control_inpaint(args) and args.inpaint_mask is None:
        raise UsageError("--control-type inpaint needs --inpaint-mask (an image, white = repaint)")
    if args.inpaint_mask is not None and args.input_image is None and not _control_inpaint(args):
        raise UsageError(
            "--inpaint-mask needs --input-image, the picture whose masked part is repainted (or --control-type "
            "inpaint, for an inpainting ControlNet)"
        )
    if kind == "image" and (args.frames is not None or args.fps is not None or args.input_video is not None):
        raise UsageError("--frames, --fps and --input-video are for video models; this model makes images")
    _check_files(args)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"--output {output}: the folder {output.parent} does not exist")
    return output


def _check_files(args: argparse.Namespace) -> None:
    for name in ("input_image", "input_video", "controlnet", "control_image", "inpaint_mask"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file")
    if args.inpaint_mask is not None:
        _open_image(args.inpaint_mask, "--inpaint-mask").close()
    for path in args.edit_image:
        if not path.is_file():
            raise FileNotFoundError(f"--edit-image {path}: no such file")
    for path, _ in args.lora:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--lora {path}: no such file")


def _control_inpaint(args: argparse.Namespace) -> bool:
    return args.control_type is not None and args.control_type.strip().lower() == "inpaint"


def _open_image(path: Path, flag: str) -> object:
    """``PIL.Image.open(path)``, decoded, or a usage error naming the option and the file when it is not an image (or
    a truncated one)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        try:
            image.load()
        except BaseException:
            image.close()
            raise
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UsageError(f"{flag} {path}: not an image (PIL cannot read it); give a PNG, JPEG or WebP file") from None


def _check_mask_target(args: argparse.Namespace, pipeline_class: type) -> None:
    """Before the model loads: where --inpaint-mask goes must be an option of the pipeline."""
    if args.inpaint_mask is None:
        return
    accepted = inspect.signature(pipeline_class.__call__).parameters
    if args.input_image is not None and "inpaint_mask" not in accepted:
        raise UsageError(
            f"--inpaint-mask: {pipeline_class.__name__} takes no inpaint mask with --input-image (it cannot inpaint)"
        )
    if _control_inpaint(args) and "controlnet_inputs" not in accepted:
        raise UsageError(f"--control-type inpaint: {pipeline_class.__name__} takes no ControlNet inputs")


def _options(args: argparse.Namespace, pipe: object, defaults: dict[str, object]) -> dict[str, object]:
    """Call options: the preset's defaults, then what the user set; refuses what the pipeline cannot take."""
    given = {
        "negative_prompt": args.negative_prompt or None,
        "num_inference_steps": args.steps,
        "height": args.height,
        "width": args.width,
        "num_frames": args.frames,
        "cfg_scale": args.cfg_scale,
        "embedded_guidance": args.guidance,
        "sigma_shift": args.sigma_shift,
        "denoising_strength": args.strength if args.strength != 1 else None,
        "tiled": args.tiled or None,
    }
    accepted = inspect.signature(type(pipe).__call__).parameters
    flags = {"num_inference_steps": "--steps", "num_frames": "--frames", "embedded_guidance": "--guidance"}
    for name, value in given.items():
        if value is not None and name not in accepted:
            flag = flags.get(name, "--" + name.replace("_", "-").replace("denoising-", ""))
            raise UsageError(f"{flag} is not an option of {type(pipe).__name__}")
    options = {k: v for k, v in defaults.items() if k in accepted}
    options.update({k: v for k, v in given.items() if v is not None})
    return options


def _mask(args: argparse.Namespace, pipe: object, accepted: object, inputs: dict[str, object]) -> object | None:
    """The --inpaint-mask image (grayscale), None without one. With --input-image it is the pipeline's
    ``inpaint_mask`` (only the masked part of the input changes), set in ``inputs``; with --control-type inpaint the
    ControlNet input gets it too."""
    if args.inpaint_mask is None:
        return None
    with _open_image(args.inpaint_mask, "--inpaint-mask") as image:
        mask = image.convert("L")
    if args.input_image is not None:
        if "inpaint_mask" not in accepted:
            raise UsageError(f"--inpaint-mask: {type(pipe).__name__} takes no inpaint mask with --input-image")
        inputs["inpaint_mask"] = mask
    return mask


def _inputs(args: argparse.Namespace, pipe: object) -> dict[str, object]:
    from PIL import Image

    accepted = inspect.signature(type(pipe).__call__).parameters
    inputs: dict[str, object] = {}
    if args.input_image is not None:
        if "input_image" not in accepted:
            raise UsageError(f"--input-image is not an option of {type(pipe).__name__}")
        with Image.open(args.input_image) as image:
            inputs["input_image"] = image.convert("RGB")
    mask = _mask(args, pipe, accepted, inputs)
    if args.input_video is not None:
        if "input_video" not in accepted:
            raise UsageError(f"--input-video is not an option of {type(pipe).__name__}")
        from ds_pipelines.media import load_video

        inputs["input_video"] = load_video(args.input_video)
    if args.edit_image:
        if "edit_image" not in accepted:
            raise UsageError(f"--edit-image is not an option of {type(pipe).__name__}")
        images = []
        for path in args.edit_image:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        inputs["edit_image"] = images
    if args.control_image is not None:
        if "controlnet_inputs" not in accepted:
            raise UsageError(f"--control-image is not an option of {type(pipe).__name__}")
        from ds_pipelines import ControlNetInput

        with Image.open(args.control_image) as image:
            control = image.convert("RGB")
        # With --control-type inpaint the control image is the picture to repaint and the mask marks where; the
        # pipeline refuses a ControlNet that has no mask input.
        inputs["controlnet_inputs"] = [
            ControlNetInput(
                control,
                scale=args.control_scale,
                control_type=args.control_type,
                inpaint_mask=mask if _control_inpaint(args) else None,
            )
        ]
    return inputs


def run(args: argparse.Namespace) -> int:
    import torch

    import ds_pipelines
    from ds_pipelines import family_for, preset_defaults, save_image

    model = args.model or ds_pipelines.catalog.DEFAULT_MODEL
    family = family_for(model)
    kind = family.kind
    output = _check(args, kind)
    sizes = {"height": args.height, "width": args.width, "frames": args.frames}
    entry = types.preset_entry(model, sizes)
    types.check_size(entry, sizes)
    types.check_size_fits(entry, sizes, args.device, tiled=args.tiled)
    pipeline_class = family.pipeline_class()
    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) != "cpu"
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    if args.controlnet is not None and "controlnet" not in pipeline_class.component_names:
        raise UsageError(f"--controlnet: {pipeline_class.__name__} takes no ControlNet")
    _check_mask_target(args, pipeline_class)
    pipe = pipeline_class.from_pretrained(
        model,
        model_configs={"controlnet": args.controlnet} if args.controlnet is not None else None,
        torch_dtype=dtype,
        device=args.device,
        vram=_vram_config(args, dtype),
        progress_bar=not args.quiet,
    )
    defaults = preset_defaults(model)
    if args.edit_image and args.height is None and args.width is None:
        # The pipeline sizes the output from the last edit image; a preset's fixed size would override that.
        defaults = {k: v for k, v in defaults.items() if k not in ("height", "width")}
    options = _options(args, pipe, defaults)
    options.update(_inputs(args, pipe))
    for path, scale in args.lora:
        pipe.load_lora(path, scale=scale)
    extra = {"model": str(model)}
    if args.lora:
        extra["loras"] = [{"file": Path(path).name, "scale": scale} for path, scale in args.lora]
    # Without --overwrite a file claims the first free name (output, output-1, ...) as it is written, so runs that
    # write to one name at the same time each keep their file; the name really written is printed.
    targets = free_paths(output, args.count, True) if args.overwrite else [output] * args.count
    for index, target in enumerate(targets):
        result = pipe(args.prompt, seed=args.seed + index, **options)
        if kind == "video":
            from ds_pipelines import save_video

            metadata = {**getattr(result, "parameters", {}), **extra}
            path = save_video(
                result, target, fps=args.fps, metadata=metadata, progress_bar=not args.quiet, overwrite=args.overwrite
            )
        else:
            parameters = {**json.loads(result.info.get("diffsynth", "{}")), **extra}
            path = save_image(result, target, parameters, overwrite=args.overwrite)
        print(path, flush=True)
    return 0
