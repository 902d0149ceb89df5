"""FLUX.1 denoising step: our FluxDiT against diffusers' FluxTransformer2DModel on identical weights.

    uv run python benchmarks/flux.py                 # CPU, 4 double + 8 single blocks of width 1024, 512x512
    uv run python benchmarks/flux.py --full --dtype bfloat16   # GPU: full-size DiT (random weights), 1024x1024,
                                                           # plus FP8 and 4 GiB streaming rows

One step is one transformer call on the latents of a ``--size`` image and ``--text-tokens`` T5 tokens, plus the
Euler update; both models run in this process, alternately, and each row is the median of ``--repeats`` steps.
Peak memory is the CUDA peak allocation on a GPU, and the anonymous RSS growth during the steps on the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from vram import PeakSampler, memory_status  # the sampler of the ds-vram benchmark


def build(args: argparse.Namespace, folder: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    from diffusers import FluxTransformer2DModel

    from ds_loader import load_model
    from ds_models_flux import DIT_SPEC

    width = 3072 if args.full else args.width
    heads = width // 128
    config = dict(
        patch_size=1,
        in_channels=64,
        num_layers=19 if args.full else args.double,
        num_single_layers=38 if args.full else args.single,
        attention_head_dim=128,
        num_attention_heads=heads,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        theirs = FluxTransformer2DModel(**config)
    theirs = theirs.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_(0, 0.02)
    theirs.save_pretrained(folder)
    dtype = getattr(torch, args.dtype)
    theirs = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(args.device).eval()
    ours = load_model(folder, device=args.device, torch_dtype=dtype, spec=DIT_SPEC)
    return ours, theirs


def variants(args: argparse.Namespace, folder: str, dtype: torch.dtype) -> dict:
    """GPU rows: weights stored in FP8 or streamed under a VRAM budget, ours against diffusers' hooks."""
    from diffusers import FluxTransformer2DModel

    from ds_loader import load_model
    from ds_models_flux import DIT_SPEC
    from ds_vram import VRAMConfig

    def ours(**vram):
        config = VRAMConfig(computation_device=args.device, computation_dtype=dtype, **vram)
        return lambda: ("ours", load_model(folder, torch_dtype=dtype, vram=config, spec=DIT_SPEC))

    def diffusers_layerwise():
        model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype).to(args.device)
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
        return "diffusers", model

    def diffusers_group_offload():
        model = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=dtype)
        model.enable_group_offload(
            onload_device=torch.device(args.device), offload_type="leaf_level", use_stream=True, record_stream=True
        )
        return "diffusers", model

    return {
        "ours fp8": ours(storage="device", storage_dtype="fp8"),
        "diffusers fp8": diffusers_layerwise,
        "ours 4GiB": ours(storage="cpu", vram_limit=4.0, prefetch=2),
        "diffusers offload": diffusers_group_offload,
    }


def time_variant(factory, inputs: tuple, repeats: int) -> tuple[float, int]:
    """Median step time and peak CUDA allocation of one freshly built model."""
    latents, img_ids, text, txt_ids, timestep, pooled, guidance = inputs
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    kind, model = factory()
    model.eval()

    def step() -> torch.Tensor:
        if kind == "ours":
            return model(latents, img_ids[None], text, txt_ids[None], timestep, pooled, guidance)
        return model(
            hidden_states=latents,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]

    times = []
    with torch.no_grad():
        step()  # warm-up: learns the execution order, fills caches
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--double", type=int, default=4)
    parser.add_argument("--single", type=int, default=8)
    parser.add_argument("--full", action="store_true", help="the released DiT size (about 24 GB in bf16)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (512 on CPU, 1024 --full)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-variants", action="store_true", help="skip the GPU FP8 and streaming rows")
    args = parser.parse_args()
    size = args.size or (1024 if args.full else 512)
    tokens = (size // 16) ** 2
    workdir = tempfile.TemporaryDirectory()
    folder = workdir.name
    ours, theirs = build(args, folder)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, tokens, 64, generator=generator).to(device, dtype)
    text = torch.randn(1, args.text_tokens, 4096, generator=generator).to(device, dtype)
    pooled = torch.randn(1, 768, generator=generator).to(device, dtype)
    side = size // 16
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, columns], -1).reshape(-1, 3).float().to(device)
    txt_ids = torch.zeros(args.text_tokens, 3, device=device)
    timestep = torch.tensor([0.7], device=device, dtype=dtype)
    guidance = torch.tensor([3.5], device=device, dtype=dtype)

    def step_ours() -> torch.Tensor:
        velocity = ours(latents, img_ids[None], text, txt_ids[None], timestep, pooled, guidance)
        return latents + (-0.05) * velocity

    def step_theirs() -> torch.Tensor:
        velocity = theirs(
            hidden_states=latents,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        return latents + (-0.05) * velocity

    steps = {"diffusers": step_theirs, "ours": step_ours}
    times: dict[str, list[float]] = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, 0)
    with torch.no_grad():
        outputs = {name: step() for name, step in steps.items()}  # warm-up; the outputs must agree
        error = ((outputs["ours"] - outputs["diffusers"]).float().norm() / outputs["diffusers"].float().norm()).item()
        del outputs
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
    results = {name: (statistics.median(times[name]), peaks[name]) for name in steps}
    if device.type == "cuda" and not args.no_variants:
        del ours, theirs, steps
        inputs = (latents, img_ids, text, txt_ids, timestep, pooled, guidance)
        for name, factory in variants(args, folder, dtype).items():
            results[name] = time_variant(factory, inputs, args.repeats)
    workdir.cleanup()
    print(
        f"FLUX.1 DiT step: width {3072 if args.full else args.width}, {tokens} image + {args.text_tokens} text "
        f"tokens, {args.dtype} on {device}; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(f"outputs agree to {error:.1e} (relative)")
    memory = "CUDA peak GiB" if device.type == "cuda" else "extra anon GiB"
    print(f"{'model':<10} {'step s':>8} {'x diffusers':>12} {memory:>15}")
    for name, (seconds, peak) in results.items():
        print(f"{name:<10} {seconds:>8.3f} {seconds / results['diffusers'][0]:>12.2f} {peak / 1024**3:>15.3f}")


if __name__ == "__main__":
    main()
