"""Peak GPU memory of each preset under each VRAM setting, measured, so ``diffsynth vram`` suggests from numbers.

For every preset (or ``--models``) and setting (resident, offload, fp8, stream: see ``ds_pipelines.catalog``),
each model of the pipeline is built at its REAL released configuration with random bf16 weights (no download),
put under ds-vram as the setting says, and run on what dominates a generation's peak at the preset's default
size: the text encoders (FLUX: CLIP 77 + T5 512 tokens; Wan: umT5 512 tokens, CLIP ViT-H/14 for 2.1 I2V/FLF2V),
one DiT forward (FLUX: the image tokens plus the joint text tokens; Wan: latents for the default frames and 512
context tokens) and the VAE decode (Wan: tiled, as the pipeline decodes by default). One model is on the GPU at
a time, and each phase's peak is combined under the setting's rule of which models share the GPU:

    resident:             sum of every model's weights + the largest (phase peak - that model's weights)
    offload, fp8, stream: the largest phase peak; FLUX's CLIP and T5 run in one step, so they add up there

Peaks are ``max_memory_reserved`` (allocator slack included) plus the CUDA context (``mem_get_info`` total - free
- reserved, the largest seen). Results merge into ``packages/ds-pipelines/src/ds_pipelines/measured_memory.json``
(or ``--output``), keyed by preset, setting, height, width, frames and GPU, written atomically.

    uv run python benchmarks/memory.py --models flux.1-dev wan2.1-t2v-1.3b    # GPU: about 5 minutes on an H100
    uv run python benchmarks/memory.py --dry-run                              # the plan, anywhere
    uv run python benchmarks/memory.py --device cpu --tiny --output /tmp/m.json   # smoke run, measures nothing

Time: building on the GPU takes seconds; most of a run is ds-vram pinning (offload) and quantizing (fp8,
stream) the weights on the CPU, about a minute per setting for a 12-14 B DiT. flux.1-dev and wan2.1-t2v-1.3b
together should take 4-6 minutes on an H100 and fit the 10-minute budget; the full sweep of every preset takes
about 30-40 minutes. On 80 GB, ``resident`` may not fit for the Wan 2.2 A14B presets (two 14 B experts, 57 GB,
plus umT5-XXL and 720p activations) nor possibly the 14 B models at 720p x 81 frames: an out-of-memory error is
recorded as ``"status": "oom"`` (the catalog then keeps its estimate) and the sweep goes on.

``--device cpu --tiny`` runs the same code on the families' tiny configs on the CPU: it exercises the path and
writes ``"device": "cpu"`` entries that the catalog ignores. Without CUDA and without it, the script exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ds_pipelines import MEMORY_SETTINGS, VRAMConfig, get_model_entry, list_models
from ds_vram import enable_vram_management

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "packages/ds-pipelines/src/ds_pipelines/measured_memory.json"
DEFAULT_MODELS = ("flux.1-dev", "wan2.1-t2v-1.3b")
TINY_SIZE = {"image": (32, 32, 1), "video": (16, 16, 5)}
CLIP_TOKENS = 77
# What each setting hands ds-vram (as `diffsynth generate` flags map; "resident": no management at all).
SETTING_CONFIGS: dict[str, dict[str, object] | None] = {
    "resident": None,
    "offload": {"storage": "cpu"},
    "fp8": {"storage": "cpu", "storage_dtype": "fp8"},
    "stream": {"storage": "cpu", "storage_dtype": "fp8", "vram_limit": 0},
}


@dataclass(frozen=True)
class Component:
    """One model of a pipeline: how to build it (random weights) and run its part of a generation."""

    name: str
    build: Callable[[], nn.Module]
    run: Callable[[nn.Module, torch.device], object]
    key: str  # components with the same key (A14B's two experts) are measured once


@dataclass(frozen=True)
class Phase:
    """Models a pipeline step keeps on the GPU together (one step of ``Pipeline.pipeline_step``)."""

    name: str
    components: tuple[Component, ...]


# ---------------------------------------------------------------------------------------------- the plans
def _flux_plan(preset_name: str, height: int, width: int, tiny: bool) -> list[Phase]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from ds_models_core import grid_positions
    from ds_models_flux import FluxDiT, FluxDiTConfig, FluxVAE, FluxVAEConfig, get_preset
    from ds_pipelines.catalog import _flux_text_encoder_configs

    preset = get_preset(preset_name)
    if preset.dit_config is None and not tiny:
        raise ValueError(f"{preset_name}: not a released config (no FluxDiTConfig preset); nothing to measure")
    dit_config = FluxDiTConfig.tiny() if tiny else FluxDiTConfig.preset(preset.dit_config)
    vae_config = FluxVAEConfig.tiny() if tiny else FluxVAEConfig.flux1()
    text_tokens = preset.t5_sequence_length

    def clip() -> nn.Module:
        if not tiny:
            return CLIPTextModel(_flux_text_encoder_configs()["text_encoder"])
        ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}
        return CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, **ids))

    def t5() -> nn.Module:
        if not tiny:
            return T5EncoderModel(_flux_text_encoder_configs()["text_encoder_2"])
        small = {"d_kv": 8, "d_ff": 37, "num_layers": 2, "num_heads": 4, "is_encoder_decoder": False}
        return T5EncoderModel(T5Config(vocab_size=99, d_model=dit_config.context_in_dim, **small))

    def run_text(module: nn.Module, device: torch.device, length: int) -> object:
        ids = torch.randint(0, module.config.vocab_size, (1, length), device=device)
        return module(input_ids=ids)

    def run_dit(dit: nn.Module, device: torch.device) -> object:
        grid = (height // 16, width // 16)
        dtype = torch.bfloat16
        img = torch.randn(1, grid[0] * grid[1], dit_config.in_channels, device=device, dtype=dtype)
        img_ids = grid_positions((1, *grid), device=device)[None]
        txt = torch.randn(1, text_tokens, dit_config.context_in_dim, device=device, dtype=dtype)
        txt_ids = torch.zeros(1, text_tokens, 3, device=device)
        y = torch.randn(1, dit_config.vec_in_dim, device=device, dtype=dtype)
        t = torch.full((1,), 0.5, device=device, dtype=dtype)
        guidance = torch.full((1,), 3.5, device=device, dtype=dtype) if dit_config.guidance_embed else None
        return dit(img, img_ids, txt, txt_ids, t, y, guidance)

    def run_vae(vae: nn.Module, device: torch.device) -> object:
        scale = vae_config.downscale
        latents = torch.randn(1, vae_config.z_channels, height // scale, width // scale, device=device)
        return vae.decode(latents.to(torch.bfloat16))

    return [
        Phase(
            "text",
            (
                Component("text_encoder", clip, lambda m, d: run_text(m, d, CLIP_TOKENS), "text_encoder"),
                Component("text_encoder_2", t5, lambda m, d: run_text(m, d, text_tokens), "text_encoder_2"),
            ),
        ),
        Phase("dit", (Component("dit", lambda: FluxDiT(dit_config), run_dit, "dit"),)),
        Phase("vae", (Component("vae", lambda: FluxVAE(vae_config), run_vae, "vae"),)),
    ]


def _wan_plan(preset_name: str, height: int, width: int, frames: int, tiny: bool) -> list[Phase]:
    from ds_models_wan import get_preset
    from ds_models_wan import image_encoder as clip_module
    from ds_models_wan import text_encoder as text_module
    from ds_models_wan.dit import WanDiT, WanDiTConfig

    preset = get_preset(preset_name)
    ti2v = preset.vae_config == "wan2.2"
    if ti2v:
        from ds_models_wan.vae22 import WanVAE22 as vae_class
        from ds_models_wan.vae22 import WanVAE22Config as vae_config_class
    else:
        from ds_models_wan.vae import WanVAE as vae_class
        from ds_models_wan.vae import WanVAEConfig as vae_config_class
    vae_config = vae_config_class.tiny() if tiny else vae_config_class.preset(preset.vae_config)
    dit_name = preset.dit_config
    if tiny:
        dit_name = {"i2v": "tiny-i2v", "flf2v": "tiny-flf2v", "ti2v": "tiny-ti2v"}.get(preset.model_type, "tiny")
    dit_config = WanDiTConfig.preset(dit_name)
    text_config = text_module.tiny_umt5_config() if tiny else text_module.umt5_xxl_config()
    text_config.d_model = dit_config.text_dim if tiny else text_config.d_model
    clip_config = clip_module.tiny_clip_vision_config() if tiny else clip_module.clip_vit_h14_config()
    scale = vae_config.spatial_compression
    latent_frames = (frames - 1) // 4 + 1

    def run_text(module: nn.Module, device: torch.device) -> object:
        ids = torch.randint(0, text_config.vocab_size, (1, dit_config.text_len), device=device)
        return module(input_ids=ids)

    def run_clip(module: nn.Module, device: torch.device) -> object:
        size = clip_config.image_size
        return module(pixel_values=torch.randn(1, 3, size, size, device=device, dtype=torch.bfloat16))

    def run_dit(dit: nn.Module, device: torch.device) -> object:
        shape = (latent_frames, height // scale, width // scale)
        dtype = torch.bfloat16
        latents = torch.randn(1, dit_config.out_dim, *shape, device=device, dtype=dtype)
        context = torch.randn(1, dit_config.text_len, dit_config.text_dim, device=device, dtype=dtype)
        clip_feature = condition = None
        if dit_config.has_image_input:
            tokens = dit_config.clip_tokens * (2 if dit_config.model_type == "flf2v" else 1)
            clip_feature = torch.randn(1, tokens, dit_config.clip_dim, device=device, dtype=dtype)
        if dit_config.in_dim > dit_config.out_dim and not ti2v:
            condition = torch.randn(1, dit_config.in_dim - dit_config.out_dim, *shape, device=device, dtype=dtype)
        t = torch.full((1,), 500.0, device=device)
        return dit(latents, t, context, clip_feature=clip_feature, condition=condition)

    def run_vae(vae: nn.Module, device: torch.device) -> object:
        latents = torch.randn(1, vae_config.z_dim, latent_frames, height // scale, width // scale, device=device)
        return vae.decode(latents.to(torch.bfloat16), tiled=True)

    phases = [
        Phase(
            "text",
            (
                Component(
                    "text_encoder", lambda: text_module.build_umt5_encoder(text_config), run_text, "text_encoder"
                ),
            ),
        )
    ]
    if "image_encoder" in preset.components:
        build_clip = lambda: clip_module.build_clip_vision_model(clip_config)  # noqa: E731
        phases.append(Phase("image", (Component("image_encoder", build_clip, run_clip, "image_encoder"),)))
    for name in (c for c in preset.components if c.startswith("dit")):  # A14B: one expert per step
        phases.append(Phase(name, (Component(name, lambda: WanDiT(dit_config), run_dit, "dit"),)))
    phases.append(Phase("vae", (Component("vae", lambda: vae_class(vae_config), run_vae, "vae"),)))
    return phases


def build_plan(preset: str, height: int, width: int, frames: int, tiny: bool) -> list[Phase]:
    """The phases of one generation of ``preset`` at this size (a family's real configs, or its tiny ones)."""
    entry = get_model_entry(preset)
    if entry.family == "flux":
        return _flux_plan(entry.name, height, width, tiny)
    if entry.family == "wan":
        return _wan_plan(entry.name, height, width, frames, tiny)
    raise ValueError(f"{preset}: no memory plan for family {entry.family!r}")


# ---------------------------------------------------------------------------------------------- measuring
def _free(device: torch.device) -> None:
    if device.type == "cuda":  # on the CPU nothing is measured, and a collection costs a third of a second
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


@contextmanager
def _bf16_on(device: torch.device) -> Iterator[None]:
    """Build modules straight on ``device`` in bf16: random init runs on the GPU in a second, buffers (position
    ids) are initialised as the constructors mean, and a 12 B model never exists in float32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _context_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return max(0, total - free - torch.cuda.memory_reserved(device))


def measure_component(component: Component, setting: str, device: torch.device) -> dict[str, int]:
    """Weights on the device after loading and the peak while the component runs, in bytes above the start."""
    _free(device)
    cuda = device.type == "cuda"
    start = torch.cuda.memory_allocated(device) if cuda else 0
    with _bf16_on(device):
        module = component.build().eval().to(device)  # .to: buffers a builder puts on the CPU (CLIP position ids)
    config = SETTING_CONFIGS[setting]
    handle = None
    if config is not None:
        module.to("cpu")
        _free(device)
        handle = enable_vram_management(module, VRAMConfig(computation_device=device, **config))
        handle.onload()
    weights = torch.cuda.memory_allocated(device) - start if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        output = component.run(module, device)
    if cuda:
        torch.cuda.synchronize(device)
    result = {
        "weights_bytes": weights,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) - start if cuda else 0,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if cuda else 0,
        "context_bytes": _context_bytes(device),
    }
    del output, module, handle
    _free(device)
    return result


def combine(setting: str, phases: list[Phase], measured: dict[str, dict[str, int]]) -> int:
    """A generation's peak from per-model measurements, under the setting's rule of who shares the GPU."""
    context = max(m["context_bytes"] for m in measured.values())

    def excess(name: str) -> int:
        return measured[name]["peak_reserved_bytes"] - measured[name]["weights_bytes"]

    def weights(names: list[str]) -> int:
        return sum(measured[name]["weights_bytes"] for name in names)

    if setting == "resident":
        names = [c.key for phase in phases for c in phase.components]
        return weights(names) + max(excess(n) for n in names) + context
    peaks = []
    for phase in phases:
        names = [c.key for c in phase.components]
        peaks.append(weights(names) + max(excess(n) for n in names))
    return max(peaks) + context


def measure(
    preset: str, setting: str, height: int, width: int, frames: int, device: torch.device, tiny: bool
) -> dict[str, object]:
    """One record of ``measured_memory.json``: a preset under a setting at a size, on this device."""
    began = time.perf_counter()
    phases = build_plan(preset, height, width, frames, tiny)
    record: dict[str, object] = {
        "preset": preset,
        "setting": setting,
        "height": height,
        "width": width,
        "frames": frames,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if tiny:
        record["tiny"] = True
    measured: dict[str, dict[str, int]] = {}
    oom = None
    try:
        for phase in phases:
            for component in phase.components:
                if component.key not in measured:
                    measured[component.key] = measure_component(component, setting, device)
    except torch.cuda.OutOfMemoryError as error:  # too large for this GPU: recorded, and the sweep goes on
        oom = str(error).splitlines()[0]
    _free(device)
    if oom is not None:
        record.update(status="oom", peak_bytes=None, error=oom)
    else:
        record.update(status="ok", peak_bytes=combine(setting, phases, measured))
    record["components"] = measured
    record["seconds"] = round(time.perf_counter() - began, 1)
    return record


# ---------------------------------------------------------------------------------------------- the file
def _key(record: dict[str, object]) -> tuple:
    return tuple(record.get(k) for k in ("preset", "setting", "height", "width", "frames", "gpu"))


def write_records(path: Path, records: list[dict[str, object]]) -> None:
    """Merge ``records`` into the JSON file at ``path`` (same key: replaced), atomically: temp file + rename."""
    existing: list[dict[str, object]] = []
    if path.exists() and path.stat().st_size:
        existing = json.loads(path.read_text()).get("measurements", [])
    merged = {_key(r): r for r in existing}
    merged.update({_key(r): r for r in records})
    ordered = sorted(merged.values(), key=lambda r: tuple(str(v) for v in _key(r)))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump({"measurements": ordered}, file, indent=1)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="preset names, or 'all'")
    parser.add_argument("--settings", nargs="+", default=list(MEMORY_SETTINGS), choices=MEMORY_SETTINGS)
    parser.add_argument("--height", type=int, help="default: each preset's")
    parser.add_argument("--width", type=int, help="default: each preset's")
    parser.add_argument("--frames", type=int, help="video frames (default: each preset's)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--device", default="cuda", help="cuda (measures) or cpu (with --tiny: a smoke run)")
    parser.add_argument("--tiny", action="store_true", help="the families' tiny configs (only with --device cpu)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Measure and record; 0 when done, 2 when this machine cannot measure what was asked."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if not args.dry_run:
        if device.type == "cuda" and not torch.cuda.is_available():
            print("memory.py: no CUDA GPU here; run on a GPU, or --device cpu --tiny for a smoke run", file=sys.stderr)
            return 2
        if (device.type == "cpu") != args.tiny:
            print("memory.py: --tiny goes with --device cpu (a smoke run), real configs with cuda", file=sys.stderr)
            return 2
    every = args.models == ["all"]
    names = [e.name for e in list_models() if e.components] if every else args.models
    plan = []
    for name in names:
        try:
            entry = get_model_entry(name)
            tiny_size = TINY_SIZE[entry.kind]
            height = args.height or (tiny_size[0] if args.tiny else entry.height)
            width = args.width or (tiny_size[1] if args.tiny else entry.width)
            frames = (args.frames or (tiny_size[2] if args.tiny else entry.frames)) if entry.kind == "video" else 1
            build_plan(entry.name, height, width, frames, args.tiny)  # closures only: checks the preset early
        except ValueError as error:
            print(f"memory.py: {'skipping: ' if every else ''}{error}", file=sys.stderr)
            if every:
                continue
            return 2
        plan.extend((entry.name, setting, height, width, frames) for setting in args.settings)
    if args.dry_run:
        for preset, setting, height, width, frames in plan:
            phases = build_plan(preset, height, width, frames, args.tiny)
            steps = "; ".join(f"{p.name}: {', '.join(c.name for c in p.components)}" for p in phases)
            print(f"{preset:22} {setting:8} {height}x{width}x{frames}  {steps}")
        print(f"-> {args.output}")
        return 0
    if device.type == "cuda":
        torch.cuda.init()
        warm = torch.ones(256, 256, device=device, dtype=torch.bfloat16)
        (warm @ warm).sum().item()  # cuBLAS handle and workspace: part of every run's context
        del warm
    records = []
    for preset, setting, height, width, frames in plan:
        record = measure(preset, setting, height, width, frames, device, args.tiny)
        peak = record["peak_bytes"]
        shown = "oom" if peak is None else f"{peak / 1024**3:.2f} GiB"
        print(
            f"{preset:22} {setting:8} {height}x{width}x{frames}  {shown:>10}  {record['seconds']:6.1f} s", flush=True
        )
        records.append(record)
        write_records(args.output, records)  # after each row: a killed run keeps what it measured
    print(f"{len(records)} records -> {args.output} ({records[0]['gpu'] if records else device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
