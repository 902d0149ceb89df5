"""Qwen-Image: our DiT step beside diffusers' QwenImageTransformer2DModel on identical weights, and on a GPU the
released 20B DiT resident against FP8 storage under an 8 GiB budget, beside diffusers' group offload.

    uv run python benchmarks/qwen_image.py                 # CPU: 4 blocks of width 512, 512x512, 128 prompt tokens
    uv run python benchmarks/qwen_image.py --full          # GPU: the released DiT (random bf16 weights), 1024x1024
    uv run python benchmarks/qwen_image.py --full --tiny   # the --full rows on the tiny test config (a CPU smoke run)

A step is one DiT call on the packed latents of a ``--size`` image and ``--text-tokens`` prompt tokens, plus the
Euler update; each row is the median of ``--repeats`` steps after one warm-up step. The CPU rows load the same
diffusers-format file into both models (ours through ds-loader) and run them alternately. ``--full`` builds the
released configuration (60 blocks of width 3072, 20.4 B parameters) with random bfloat16 weights on the GPU, shared
by both models (no file: 41 GB would take minutes to write), and times:

- ``diffusers resident`` and ``ours resident``: every weight on the GPU in bfloat16;
- ``ours fp8 8GiB``: ds-vram, weights stored in pinned CPU RAM as FP8 with per-channel scales, computed in bfloat16,
  at most ``--vram-limit`` GiB of weights on the GPU at a time (the embedders and output layers stay bfloat16);
- ``diffusers offload``: diffusers' ``enable_group_offload`` (leaf level, CUDA streams), bfloat16 weights in CPU RAM.

The issue's goal is the FP8 row under 8 GB of VRAM at no more than 1.3x the resident step time. Peak memory is the
CUDA peak allocation during the steps (on the CPU, the anonymous RSS growth).
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
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vram import PeakSampler, memory_status  # the sampler of the ds-vram benchmark

TINY = dict(
    num_layers=2, attention_head_dim=32, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12)
)


def diffusers_kwargs(args: argparse.Namespace) -> dict:
    """The DiT configuration of this run, as diffusers' constructor arguments."""
    if args.full and args.tiny:
        return dict(TINY)
    if args.full:
        return {}  # diffusers' defaults are the released Qwen-Image DiT
    if args.width % 128:
        raise SystemExit(f"--width={args.width} must be a multiple of 128 (heads of 128, as released)")
    return dict(num_layers=args.layers, attention_head_dim=128, num_attention_heads=args.width // 128)


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights of a realistic scale: matrices N(0, 0.02), norm scales 1, biases 0."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0, 0.02)
            elif "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    return model


def on_meta(**kwargs: object) -> torch.nn.Module:
    """diffusers' DiT built without memory. Its RoPE tables are plain tensors computed in the constructor, which the
    meta device leaves empty: they are built again on the CPU."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**kwargs)
    rope = model.pos_embed
    model.pos_embed = type(rope)(theta=10000, axes_dim=list(model.config.axes_dims_rope), scale_rope=True)
    return model


def ours_sharing(theirs: torch.nn.Module) -> torch.nn.Module:
    """Our DiT holding diffusers' very tensors (same names, no copy)."""
    from ds_models_qwen_image.dit import QwenImageDiT, QwenImageDiTConfig

    config = theirs.config
    ours_config = QwenImageDiTConfig(
        num_layers=config.num_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.joint_attention_dim,
        axes_dims_rope=tuple(config.axes_dims_rope),
    )
    with torch.device("meta"):
        ours = QwenImageDiT(ours_config)
    ours.load_state_dict(theirs.state_dict(), assign=True, strict=True)
    return ours.eval()


def make_inputs(args: argparse.Namespace, joint_dim: int, device: torch.device, dtype: torch.dtype) -> dict:
    size = args.size or (64 if args.tiny else 1024 if args.full else 512)
    h = w = size // 16
    generator = torch.Generator().manual_seed(1)
    return {
        "tokens": torch.randn(1, h * w, 64, generator=generator).to(device, dtype),
        "text": torch.randn(1, args.text_tokens, joint_dim, generator=generator).to(device, dtype),
        "sigma": torch.tensor([0.6], device=device, dtype=dtype),
        "shape": (1, h, w),
        "size": size,
    }


def step_function(kind: str, model: torch.nn.Module, inputs: dict) -> Callable[[], torch.Tensor]:
    """One denoising step: the DiT's velocity and the Euler update of the packed latents (sigma falls by 0.05)."""
    tokens, text, sigma, shape = inputs["tokens"], inputs["text"], inputs["sigma"], inputs["shape"]

    def ours() -> torch.Tensor:
        return tokens - 0.05 * model(tokens, sigma, text, None, [shape])

    def theirs() -> torch.Tensor:
        velocity = model(
            hidden_states=tokens,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=None,
            timestep=sigma,
            img_shapes=[[shape]],
            return_dict=False,
        )[0]
        return tokens - 0.05 * velocity

    return ours if kind == "ours" else theirs


def measure(step: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> tuple[float, int, torch.Tensor]:
    """(median seconds, peak bytes, the warm-up step's output) of ``step``."""
    cuda = device.type == "cuda"
    with torch.no_grad():
        output = step()  # warm-up: streaming learns the execution order here
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = memory_status()["RssAnon"]
        times = []
        with PeakSampler() as sampler:
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else sampler.peak - before
    return statistics.median(times), peak, output.float().cpu()


def relative_error(ours: torch.Tensor, theirs: torch.Tensor, inputs: dict) -> float:
    start = inputs["tokens"].float().cpu()
    return ((ours - start) - (theirs - start)).norm().item() / (theirs - start).norm().item()


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.machine()}, {os.cpu_count()} CPUs"


# ---------------------------------------------------------------------------------------------- the DiT step (CPU)
def dit_step(args: argparse.Namespace) -> None:
    from diffusers import QwenImageTransformer2DModel

    from ds_loader import load_model
    from ds_models_qwen_image.dit_specs import DIT_SPEC

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    workdir = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    randomize_(on_meta(**diffusers_kwargs(args)).to_empty(device="cpu")).save_pretrained(workdir.name)
    theirs = QwenImageTransformer2DModel.from_pretrained(workdir.name, torch_dtype=dtype).to(device).eval()
    ours = load_model(workdir.name, device=device, torch_dtype=dtype, spec=DIT_SPEC).eval()
    inputs = make_inputs(args, theirs.config.joint_attention_dim, device, dtype)
    rows, outputs = {}, {}
    for _ in range(2):  # alternately, so drifts in machine speed hit both alike; the second round counts
        for name, model in (("diffusers", theirs), ("ours", ours)):
            seconds, peak, outputs[name] = measure(step_function(name, model, inputs), device, args.repeats)
            rows[name] = (seconds, peak)
    workdir.cleanup()
    h, w = inputs["shape"][1:]
    print(
        f"Qwen-Image DiT step: width {args.width}, {args.layers} blocks, {h * w} image + {args.text_tokens} prompt "
        f"tokens ({inputs['size']}x{inputs['size']}), {args.dtype} on {machine(device)}, torch {torch.__version__}"
    )
    error = relative_error(outputs["ours"], outputs["diffusers"], inputs)
    print(f"outputs agree to {error:.1e} (relative, of the update)")
    print_rows(rows, "diffusers", device)


def print_rows(rows: dict[str, tuple[float, int]], baseline: str, device: torch.device) -> None:
    memory = "CUDA peak GiB" if device.type == "cuda" else "extra anon GiB"
    print(f"{'model':<22} {'step s':>8} {'x ' + baseline:>20} {memory:>15}")
    for name, (seconds, peak) in rows.items():
        ratio = seconds / rows[baseline][0]
        print(f"{name:<22} {seconds:>8.3f} {ratio:>20.2f} {peak / 1024**3:>15.3f}")


# ---------------------------------------------------------------------------------------------- released size (GPU)
def full_size(args: argparse.Namespace) -> None:
    from ds_vram import VRAMConfig, enable_vram_management

    device, dtype = torch.device(args.device), torch.bfloat16
    cuda = device.type == "cuda"
    if not cuda and not args.tiny:
        raise SystemExit("--full needs a CUDA GPU (41 GB of bfloat16 weights); --full --tiny runs the rows on the CPU")
    kwargs = diffusers_kwargs(args)
    start = time.perf_counter()
    torch.manual_seed(0)
    theirs = randomize_(on_meta(**kwargs).to_empty(device=device).to(dtype)).eval()
    count = sum(p.numel() for p in theirs.parameters())
    seconds = time.perf_counter() - start
    print(f"built a random-weight Qwen-Image DiT of {count / 1e9:.2f} B parameters in {seconds:.0f} s")
    inputs = make_inputs(args, theirs.config.joint_attention_dim, device, dtype)
    rows, outputs = {}, {}

    def row(name: str, kind: str, model: torch.nn.Module) -> None:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        seconds, peak, outputs[name] = measure(step_function(kind, model, inputs), device, args.repeats)
        rows[name] = (seconds, peak)
        print(f"  {name}: {seconds:.3f} s/step, peak {peak / 1024**3:.2f} GiB", flush=True)

    row("diffusers resident", "diffusers", theirs)
    ours = ours_sharing(theirs)
    row("ours resident", "ours", ours)
    # Keep a CPU copy for diffusers' offload row, then hand ds-vram the GPU tensors: it quantizes each layer where
    # it lies (fast on the GPU) and stores the FP8 result in pinned CPU RAM.
    cpu_state = {key: value.to("cpu") for key, value in theirs.state_dict().items()}
    del theirs
    config = VRAMConfig(
        storage="cpu",
        storage_dtype="fp8",
        computation_device=device,
        computation_dtype=dtype,
        vram_limit=args.vram_limit,
    )
    enable_vram_management(ours, config)
    row(f"ours fp8 {args.vram_limit:g}GiB", "ours", ours)
    del ours
    gc.collect()
    offloaded = on_meta(**kwargs)
    offloaded.load_state_dict(cpu_state, assign=True)
    del cpu_state
    offloaded.eval().enable_group_offload(
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        use_stream=cuda,  # CUDA streams overlap the copies with compute; the CPU smoke run has none
        record_stream=cuda,
    )
    row("diffusers offload", "diffusers", offloaded)
    del offloaded

    h, w = inputs["shape"][1:]
    kind = "tiny smoke run" if args.tiny else "released size, random weights"
    print(
        f"Qwen-Image DiT ({kind}), {inputs['size']}x{inputs['size']} ({h * w} image + {args.text_tokens} prompt "
        f"tokens), bfloat16 on {machine(device)}; torch {torch.__version__}"
    )
    for name in rows:
        if name != "diffusers resident":
            error = relative_error(outputs[name], outputs["diffusers resident"], inputs)
            print(f"{name} agrees with diffusers resident to {error:.1e} (relative, of the update)")
    print_rows(rows, "ours resident", device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=512, help="DiT width of the CPU step (heads of 128)")
    parser.add_argument("--layers", type=int, default=4, help="DiT blocks of the CPU step")
    parser.add_argument("--full", action="store_true", help="the released 20B DiT, resident, FP8 and offloaded (GPU)")
    parser.add_argument("--tiny", action="store_true", help="with --full: the tiny test config, a CPU smoke run")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (512 CPU, 1024 --full)")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vram-limit", type=float, default=8.0, help="GiB of weights on the GPU in the FP8 row")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the CPU step")
    args = parser.parse_args()
    if args.full:
        full_size(args)
    else:
        dit_step(args)


if __name__ == "__main__":
    main()
