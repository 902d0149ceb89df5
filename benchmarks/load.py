"""Time to first forward and extra anonymous memory when loading a >= 4 GiB bf16 checkpoint.

Compares ds_loader.load_model with diffusers ``from_pretrained`` and with ``safetensors.torch.load_file`` +
``load_state_dict(assign=True)``, on the same FLUX-shaped file (random bf16 Linear blocks, hidden size 3072),
each in a fresh subprocess, with a warm page cache (the file read once before the run) and a cold one
(``posix_fadvise(DONTNEED)`` evicts the file's pages, no root needed). Also shows a dtype change (bf16 file to
fp16 weights) and ds-vram disk storage through ds_loader.

    uv run python benchmarks/load.py                 # makes the file in a temp dir, prints the table
    uv run python benchmarks/load.py --dir /data/b   # reuse a file made before (kept with --keep)

"extra RssAnon" is anonymous resident memory after the first forward minus before loading; "peak" samples it
every 2 ms during load and forward. File-backed pages (the mapped checkpoint) are not anonymous memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DIM = 3072
IN_CHANNELS = 64
FILE = "diffusion_pytorch_model.safetensors"
GIB = 2**30


def build(module: nn.Module, num_blocks: int, dim: int) -> None:
    """FLUX-shaped layers: per block a fused qkv, an output projection and a 4x MLP, ~113 M parameters."""
    module.img_in = nn.Linear(IN_CHANNELS, dim)
    module.blocks = nn.ModuleList()
    for _ in range(num_blocks):
        block = nn.Module()
        block.qkv = nn.Linear(dim, 3 * dim)
        block.proj = nn.Linear(dim, dim)
        block.mlp_in = nn.Linear(dim, 4 * dim)
        block.mlp_out = nn.Linear(4 * dim, dim)
        module.blocks.append(block)
    module.proj_out = nn.Linear(dim, IN_CHANNELS)


def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = module.img_in(x)
    for block in module.blocks:
        q, k, v = block.qkv(x).chunk(3, dim=-1)
        x = x + block.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        x = x + block.mlp_out(torch.nn.functional.gelu(block.mlp_in(x)))
    return module.proj_out(x)


@dataclass(frozen=True)
class BenchConfig:
    num_blocks: int
    dim: int = DIM


class BenchDiT(nn.Module):
    def __init__(self, config: BenchConfig):
        super().__init__()
        build(self, config.num_blocks, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self, x)


def diffusers_class() -> type:
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class BenchTransformer(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, num_blocks: int = 20, dim: int = DIM):
            super().__init__()
            build(self, num_blocks, dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return forward(self, x)

    return BenchTransformer


def bench_spec():
    from ds_loader import Detection, Mismatch, ModelSpec

    def detect(view):
        if "img_in.weight" not in view or "blocks.0.qkv.weight" not in view:
            return Mismatch("not the benchmark model")
        return Detection("original", BenchConfig(view.count_blocks("blocks."), view.shape("img_in.weight")[0]))

    return ModelSpec(
        name="bench.dit",
        family="bench",
        model_class=BenchDiT,
        config_class=BenchConfig,
        detect=detect,
        formats={"original": None},
    )


def make_checkpoint(folder: Path, gib: float) -> Path:
    from safetensors.torch import save_file

    per_block = (3 * DIM * DIM + DIM * DIM + 8 * DIM * DIM) * 2
    num_blocks = max(1, int(-(-gib * GIB // per_block)))
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in BenchDiT(BenchConfig(num_blocks)).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, (shape, _) in shapes.items():
        state[key] = (torch.rand(shape, generator=generator, dtype=torch.float32) - 0.5).mul_(0.02).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / FILE)
    config = {"_class_name": "BenchTransformer", "_diffusers_version": "0.35.0", "num_blocks": num_blocks, "dim": DIM}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / FILE


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not in /proc/self/status")


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = rss_anon()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.002)


def load(method: str, folder: Path, dtype: torch.dtype) -> nn.Module:
    path = folder / FILE
    if method == "ds_loader":
        from ds_loader import load_model

        return load_model(path, torch_dtype=dtype, spec=bench_spec())
    if method == "ds_loader+vram_disk":
        from ds_loader import load_model
        from ds_vram import VRAMConfig

        config = VRAMConfig(storage="disk", computation_device="cpu", computation_dtype=dtype)
        return load_model(path, vram=config, spec=bench_spec())
    if method == "diffusers":
        return diffusers_class().from_pretrained(folder, torch_dtype=dtype).eval()
    if method == "load_file+assign":
        from safetensors.torch import load_file

        config = json.loads((folder / "config.json").read_text())
        with torch.device("meta"):
            model = BenchDiT(BenchConfig(config["num_blocks"], config["dim"]))
        state = load_file(path)
        if dtype != torch.bfloat16:
            state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        return model.eval()
    raise ValueError(f"unknown method {method!r}")


def child(method: str, folder: Path, dtype_name: str) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    import diffusers  # noqa: F401 - imported by every method so import time and memory cancel out
    import safetensors.torch  # noqa: F401

    import ds_loader  # noqa: F401

    dtype = getattr(torch, dtype_name)
    x = torch.randn(1, 1, IN_CHANNELS, dtype=dtype)
    before = rss_anon()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    with torch.no_grad():
        model = load(method, folder, dtype)
        loaded = time.perf_counter()
        out = model(x)
    done = time.perf_counter()
    sampler.stop.set()
    sampler.join()
    after = rss_anon()
    assert torch.isfinite(out.float()).all()
    print(
        json.dumps(
            {
                "load_s": loaded - start,
                "first_forward_s": done - start,
                "extra_anon": after - before,
                "peak_anon": max(sampler.peak, after) - before,
            }
        )
    )


def evict(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def warm(path: Path) -> None:
    with open(path, "rb") as handle:
        while handle.read(64 * 2**20):
            pass


def run(method: str, folder: Path, dtype: str, cache: str) -> dict:
    if cache == "cold":
        evict(folder / FILE)
    else:
        warm(folder / FILE)
    command = [sys.executable, __file__, "--child", method, "--dir", str(folder), "--dtype", dtype]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


RUNS = [
    ("diffusers", "bfloat16"),
    ("ds_loader", "bfloat16"),
    ("load_file+assign", "bfloat16"),
    ("ds_loader+vram_disk", "bfloat16"),
    ("diffusers", "float16"),
    ("ds_loader", "float16"),
    ("load_file+assign", "float16"),
]


def table(rows: list[tuple[str, str, str, dict]], size: int) -> str:
    baseline = {(d, c): r["first_forward_s"] for m, d, c, r in rows if m == "diffusers" and "error" not in r}
    header = f"{'method':<22}{'dtype':<10}{'cache':<7}{'load s':>8}{'1st fwd s':>11}{'vs diffusers':>14}"
    header += f"{'extra anon GiB':>16}{'peak anon GiB':>15}"
    lines = [header, "-" * len(header)]
    for method, dtype, cache, r in rows:
        if "error" in r:
            lines.append(f"{method:<22}{dtype:<10}{cache:<7}  failed: {r['error']}")
            continue
        base = baseline.get((dtype, cache))
        ratio = f"{r['first_forward_s'] / base:.2f}x" if base else "-"
        lines.append(
            f"{method:<22}{dtype:<10}{cache:<7}{r['load_s']:>8.2f}{r['first_forward_s']:>11.2f}{ratio:>14}"
            f"{r['extra_anon'] / GIB:>16.2f}{r['peak_anon'] / GIB:>15.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="folder holding (or to hold) the checkpoint")
    parser.add_argument("--gib", type=float, default=4.2, help="checkpoint size to make (default 4.2 GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="warm runs per method; the fastest is shown")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint made in a temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir, args.dtype)
        return
    folder = args.dir or Path(tempfile.mkdtemp(prefix="ds-load-bench-"))
    made = not (folder / FILE).exists()
    try:
        if made:
            print(f"making a {args.gib} GiB bf16 checkpoint in {folder} ...", flush=True)
            make_checkpoint(folder, args.gib)
        size = (folder / FILE).stat().st_size
        rows = []
        for method, dtype in RUNS:
            tries = [run(method, folder, dtype, "warm") for _ in range(args.repeat)]
            ok = [t for t in tries if "error" not in t]
            rows.append((method, dtype, "warm", min(ok, key=lambda t: t["first_forward_s"]) if ok else tries[0]))
        if not args.no_cold:
            for method, dtype in RUNS[:4]:
                rows.append((method, dtype, "cold", run(method, folder, dtype, "cold")))
        cpu = platform.processor() or platform.machine()
        print(
            f"\n{size / GIB:.2f} GiB bf16 checkpoint, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"first forward on a (1, 1, {IN_CHANNELS}) input, CPU"
        )
        print(table(rows, size))
    finally:
        if made and not args.keep and args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
