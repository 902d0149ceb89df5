"""Z-Image: our DiT step beside diffusers' ZImageTransformer2DModel on identical weights, and on a GPU whole images.

    uv run python benchmarks/z_image.py                 # CPU: 4 layers of width 768, 512x512, 128 caption tokens
    uv run python benchmarks/z_image.py --full          # GPU: Z-Image-Turbo at its released size (random weights),
                                                        # 1024x1024 in 8 steps, against diffusers' ZImagePipeline
    uv run python benchmarks/z_image.py --full --tiny   # the same rows on the tiny test models (a CPU smoke run)

The step is one transformer call on the latents of a ``--size`` image and ``--text-tokens`` caption tokens plus the
Euler update; both models run in this process, alternately, and each row is the median of ``--repeats`` steps.
``--full`` writes a released-size Turbo repository (transformer/, text_encoder/, vae/, a small tokenizer) with
random weights to a temporary folder, then times whole images (prompt encoding, 8 steps, decoding) with every model
resident, and with the text encoder and the VAE stored in FP8 (ours: ds-vram; diffusers: layerwise casting). The DiT
stays in bfloat16, as it should for Turbo. Peak memory is the CUDA peak allocation; on the CPU, the anonymous RSS
growth during the steps.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vram import PeakSampler, memory_status  # the sampler of the ds-vram benchmark

PROMPT = "a red fox in fresh snow, golden hour, photograph"


# ---------------------------------------------------------------------------------------------- the DiT step (CPU)
def build_dits(args: argparse.Namespace, folder: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import ZImageTransformer2DModel

    from ds_loader import load_model
    from ds_models_z_image import DIT_SPEC

    if args.width % 128:
        raise SystemExit(f"--width={args.width} must be a multiple of 128 (heads of 128, as released)")
    heads = args.width // 128
    config = dict(dim=args.width, n_layers=args.layers, n_heads=heads, n_kv_heads=heads)
    torch.manual_seed(0)
    with torch.device("meta"):
        theirs = ZImageTransformer2DModel(**config)
    theirs = theirs.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(0, 0.02)
    theirs.save_pretrained(folder)
    dtype = getattr(torch, args.dtype)
    theirs = ZImageTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(args.device).eval()
    ours = load_model(folder, device=args.device, torch_dtype=dtype, spec=DIT_SPEC).eval()
    return ours, theirs


def dit_step(args: argparse.Namespace) -> None:
    size = args.size or 512
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    workdir = tempfile.TemporaryDirectory()
    ours, theirs = build_dits(args, workdir.name)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, size // 8, size // 8, generator=generator).to(device, dtype)
    text = torch.randn(1, args.text_tokens, 2560, generator=generator).to(device, dtype)
    t = torch.tensor([0.3], device=device, dtype=dtype)  # the model's time, 1 - sigma

    def step_ours() -> torch.Tensor:
        return latents + 0.05 * ours(latents, t, text)  # velocity = -output; sigma falls by 0.05

    def step_theirs() -> torch.Tensor:
        output = theirs([latents[0].unsqueeze(1)], t, [text[0]], return_dict=False)[0][0].squeeze(1)
        return latents + 0.05 * output[None]

    steps = {"diffusers": step_theirs, "ours": step_ours}
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, 0)
    with torch.no_grad():
        outputs = {name: step() for name, step in steps.items()}  # warm-up; the outputs must agree
        delta = {name: output - latents for name, output in outputs.items()}
        error = ((delta["ours"] - delta["diffusers"]).float().norm() / delta["diffusers"].float().norm()).item()
        del outputs, delta
        for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit both alike
            for name, step in steps.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                before = memory_status()["RssAnon"]
                with PeakSampler() as sampler:
                    start = time.perf_counter()
                    step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
                peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else sampler.peak - before
                peaks[name] = max(peaks[name], peak)
    workdir.cleanup()
    tokens = (size // 16) ** 2
    print(
        f"Z-Image DiT step: width {args.width}, {args.layers} layers, {tokens} image + {args.text_tokens} caption "
        f"tokens, {args.dtype} on {device}; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"outputs agree to {error:.1e} (relative, of the update)")
    memory = "CUDA peak GiB" if device.type == "cuda" else "extra anon GiB"
    print(f"{'model':<10} {'step s':>8} {'x diffusers':>12} {memory:>15}")
    for name in steps:
        seconds = statistics.median(times[name])
        ratio = seconds / statistics.median(times["diffusers"])
        print(f"{name:<10} {seconds:>8.3f} {ratio:>12.2f} {peaks[name] / 1024**3:>15.3f}")


# ---------------------------------------------------------------------------------------------- whole images (GPU)
def write_turbo_repository(folder: Path, device: torch.device) -> None:
    """Z-Image-Turbo's released components at full size with random weights, in its diffusers layout."""
    import json

    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from tests.pipelines.z_image_fixtures import write_qwen_tokenizer

    vocab = write_qwen_tokenizer(folder / "tokenizer")
    parts = {
        "transformer": lambda: ZImageTransformer2DModel(),  # the released configuration is diffusers' default
        "text_encoder": lambda: Qwen3Model(
            Qwen3Config(
                vocab_size=max(vocab, 151936),
                hidden_size=2560,
                intermediate_size=9728,
                num_hidden_layers=36,
                num_attention_heads=32,
                num_key_value_heads=8,
                head_dim=128,
                max_position_embeddings=40960,
                rope_theta=1000000.0,
                tie_word_embeddings=True,
            )
        ),
        "vae": lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
    }
    for name, build in parts.items():
        with torch.device("meta"):
            module = build()
        module = module.to_empty(device=device).to(torch.bfloat16)
        with torch.no_grad():
            for parameter_name, parameter in module.named_parameters():
                if parameter.ndim == 1 and "norm" in parameter_name:
                    parameter.fill_(1.0)
                elif parameter.ndim == 1:
                    parameter.zero_()
                else:
                    parameter.normal_(0, 0.02)
        module.save_pretrained(folder / name)
        del module
        torch.cuda.empty_cache()
    scheduler = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(scheduler | {"use_dynamic_shifting": False})
    )
    index = {"_class_name": "ZImagePipeline"}
    index |= {name: ["diffusers", type_] for name, type_ in [("transformer", "ZImageTransformer2DModel")]}
    index |= {"vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    index |= {"text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"]}
    (folder / "model_index.json").write_text(json.dumps(index))


def load_ours(folder: Path, device: torch.device, fp8: bool):
    from ds_pipelines.z_image import ZImagePipeline
    from ds_vram import VRAMConfig

    vram = None
    if fp8:  # everything but the DiT stored in FP8 on the GPU
        stored = VRAMConfig(storage="device", storage_dtype="fp8", computation_device=device)
        vram = {"text_encoder": stored, "vae": stored}
    return ZImagePipeline.from_pretrained(
        folder, torch_dtype=torch.bfloat16, device=device, vram=vram, progress_bar=False
    )


def load_diffusers(folder: Path, device: torch.device, fp8: bool):
    from diffusers import ZImagePipeline as DiffusersZImagePipeline

    pipe = DiffusersZImagePipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).to(device)
    pipe.set_progress_bar_config(disable=True)
    if fp8:
        from diffusers.hooks import apply_layerwise_casting

        pipe.vae.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        # a transformers model has no enable_layerwise_casting; the hook itself works on any module
        apply_layerwise_casting(pipe.text_encoder, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    return pipe


def whole_images(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda and not args.tiny:
        raise SystemExit(
            "--full needs a CUDA GPU (about 24 GB of weights in bfloat16); --tiny runs the rows on the CPU"
        )
    workdir = tempfile.TemporaryDirectory(dir=args.workdir)
    folder = Path(workdir.name) / "Z-Image-Turbo"
    start = time.perf_counter()
    if args.tiny:  # the tests' tiny repository: a smoke run of these rows, not a measurement
        from tests.pipelines.z_image_fixtures import write_repo

        write_repo(folder)
    else:
        write_turbo_repository(folder, device)
    print(f"wrote a random-weight Z-Image-Turbo in {time.perf_counter() - start:.0f} s")
    size, steps = args.size or (64 if args.tiny else 1024), 8
    noise = torch.randn(1, 16, size // 8, size // 8, generator=torch.Generator().manual_seed(0))

    def run_ours(pipe) -> None:
        pipe(PROMPT, height=size, width=size, num_inference_steps=steps, cfg_scale=1.0, noise=noise)

    def run_theirs(pipe) -> None:
        latents = noise.to(device)
        pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=0.0, latents=latents)

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize()

    rows = {}
    for fp8 in (False, True):
        for name, load, call in (("diffusers", load_diffusers, run_theirs), ("ours", load_ours, run_ours)):
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            before = memory_status()["RssAnon"]
            with PeakSampler() as sampler:
                pipe = load(folder, device, fp8)
                call(pipe)  # warm-up
                times = []
                for _ in range(args.repeats):
                    synchronize()
                    begin = time.perf_counter()
                    call(pipe)
                    synchronize()
                    times.append(time.perf_counter() - begin)
            peak = torch.cuda.max_memory_allocated() if cuda else sampler.peak - before
            rows[f"{name} {'fp8 TE+VAE' if fp8 else 'resident'}"] = (statistics.median(times), peak)
            del pipe
    workdir.cleanup()
    where = torch.cuda.get_device_name() if cuda else f"the CPU ({os.cpu_count()} cores)"
    kind = "tiny smoke run" if args.tiny else "released size, random weights"
    print(
        f"Z-Image-Turbo ({kind}), {size}x{size}, {steps} steps, no CFG, bfloat16 on {where}; torch {torch.__version__}"
    )
    memory = "CUDA peak GiB" if cuda else "peak anon GiB"
    print(f"{'pipeline':<24} {'s/image':>8} {'x diffusers':>12} {memory:>14}")
    for name, (seconds, peak) in rows.items():
        baseline = rows[f"diffusers {name.split(' ', 1)[1]}"][0]
        print(f"{name:<24} {seconds:>8.2f} {seconds / baseline:>12.2f} {peak / 1024**3:>14.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768, help="DiT width of the step benchmark (heads of 128)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--full", action="store_true", help="whole Turbo images at the released size (GPU)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (512 step, 1024 --full)")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--workdir", default=None, help="where --full writes its temporary repository")
    parser.add_argument("--tiny", action="store_true", help="with --full: the tiny test models, a CPU smoke run")
    args = parser.parse_args()
    if args.full:
        whole_images(args)
    else:
        dit_step(args)


if __name__ == "__main__":
    main()
