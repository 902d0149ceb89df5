"""Peak GPU memory of each preset under each VRAM setting, measured, so ``diffsynth vram`` suggests from numbers.

For every preset (or ``--models``) and setting (resident, offload, fp8, stream: see ``ds_pipelines.catalog``), the
preset's family is read from the registry (``ds_loader.families``); this script names no family:

- the models: the family descriptor's ``build_components(preset)``, its REAL released configurations with random bf16
  weights (no download), built together straight on the GPU (the CPU where they do not fit) and parked on the CPU;
- how each runs: the family pipeline's ``run_component``, on random inputs at the preset's default size, doing what
  dominates a generation's peak (text encoders on their full prompt length, one DiT prediction through the
  pipeline's ``predict``, the VAE decode as the pipeline decodes by default);
- which share the GPU: the pipeline's ``@pipeline_step`` declarations. Each distinct set of models a step declares,
  restricted to the preset's components (its file names map to the pipeline's through ``preset_components``), is a
  phase. Components of one architecture (Wan 2.2 A14B's two experts) are measured once.

One model is on the GPU at a time, under ds-vram as the setting says, and each phase's peak is combined under the
setting's rule of which models share the GPU:

    resident:             sum of every model's weights + the largest (phase peak - that model's weights)
    offload, fp8, stream: the largest phase peak; models one step declares together (FLUX.1's CLIP and T5) add up

Peaks are ``max_memory_reserved`` (allocator slack included) plus the CUDA context (``mem_get_info`` total - free
- reserved, the largest seen). Results merge into ``packages/ds-pipelines/src/ds_pipelines/measured_memory.json``
(or ``--output``), keyed by preset, setting, height, width, frames and GPU, written atomically.

    uv run python benchmarks/memory.py --models flux.1-dev wan2.1-t2v-1.3b    # GPU: about 5 minutes on an H100
    uv run python benchmarks/memory.py --dry-run                              # the plan, anywhere
    uv run python benchmarks/memory.py --device cpu --tiny --output /tmp/m.json   # smoke run, measures nothing

Time: building on the GPU takes seconds; most of a run is ds-vram pinning (offload) and quantizing (fp8,
stream) the weights on the CPU, about a minute per setting for a 12-14 B DiT. flux.1-dev and wan2.1-t2v-1.3b
together should take 4-6 minutes on an H100 and fit the 10-minute budget; the full sweep of every preset takes
about 30-40 minutes. Building a preset's models together needs their sum in GPU memory for a moment (Wan 2.2
A14B: about 70 GB); where that does not fit they are built on the CPU, which takes minutes. On 80 GB,
``resident`` may not fit for the Wan 2.2 A14B presets (two 14 B experts, 57 GB, plus umT5-XXL and 720p
activations) nor possibly the 14 B models at 720p x 81 frames: an out-of-memory error is recorded as
``"status": "oom"`` (the catalog then keeps its estimate) and the sweep goes on.

``--device cpu --tiny`` runs the same code on the families' ``build_tiny_components`` on the CPU: it exercises the
path and writes ``"device": "cpu"`` entries that the catalog ignores. Without CUDA and without it, the script
exits 2.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ds_loader.families import FamilyDescriptor, Preset, get_family
from ds_pipelines import MEMORY_SETTINGS, VRAMConfig, get_model_entry, list_models
from ds_vram import enable_vram_management

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "packages/ds-pipelines/src/ds_pipelines/measured_memory.json"
DEFAULT_MODELS = ("flux.1-dev", "wan2.1-t2v-1.3b")
TINY_SIZE = {"image": (32, 32, 1), "video": (32, 32, 5), "audio-video": (32, 32, 5)}
# What each setting hands ds-vram (as `diffsynth generate` flags map; "resident": no management at all).
SETTING_CONFIGS: dict[str, dict[str, object] | None] = {
    "resident": None,
    "offload": {"storage": "cpu"},
    "fp8": {"storage": "cpu", "storage_dtype": "fp8"},
    "stream": {"storage": "cpu", "storage_dtype": "fp8", "vram_limit": 0},
}


@dataclass(frozen=True)
class Component:
    """One model of a preset: ``name`` in the preset's files (and ``build_components``), ``role`` the pipeline
    component it becomes (what ``run_component`` is told), ``key`` the role of the first component of the same
    architecture (A14B's two experts share one) under which it is measured once and recorded."""

    name: str
    role: str
    key: str


@dataclass(frozen=True)
class Phase:
    """Models the GPU holds together: a set declared by ``@pipeline_step`` (``name``: the steps declaring it)."""

    name: str
    components: tuple[Component, ...]


@dataclass(frozen=True)
class Plan:
    """One generation of ``preset`` at a size: its models, how they run and which share the GPU."""

    preset: Preset
    family: FamilyDescriptor
    pipeline: type
    height: int
    width: int
    frames: int
    tiny: bool
    components: tuple[Component, ...]
    phases: tuple[Phase, ...]

    def build(self) -> dict[str, nn.Module]:
        """Every model by ``Component.name``, built in the caller's device and dtype context."""
        builder = self.family.build_tiny_components if self.tiny else self.family.build_components
        return dict(builder(self.preset))

    def run(self, component: Component, module: nn.Module, device: torch.device) -> object:
        size = {"height": self.height, "width": self.width, "frames": self.frames}
        return self.pipeline.run_component(component.role, module, **size, device=device, preset=self.preset)


# ---------------------------------------------------------------------------------------------- the plan
def _architecture(module: nn.Module) -> tuple:
    return type(module), tuple((name, tuple(t.shape), t.dtype) for name, t in module.state_dict().items())


def step_phases(pipeline: type, components: tuple[Component, ...]) -> tuple[Phase, ...]:
    """Each distinct set of models a ``@pipeline_step`` of ``pipeline`` declares (``step_models``), restricted to
    ``components``, in the order the steps are defined; a step using none of them is no phase."""
    steps: dict[tuple[Component, ...], list[str]] = {}
    for attribute in dict.fromkeys(a for klass in reversed(pipeline.__mro__) for a in vars(klass)):
        models = getattr(getattr(pipeline, attribute, None), "step_models", None)
        if models is None:
            continue
        held = tuple(c for c in components if c.role in models)
        if held:
            steps.setdefault(held, []).append(attribute)
    return tuple(Phase("/".join(names), held) for held, names in steps.items())


def build_plan(preset: str, height: int, width: int, frames: int, tiny: bool) -> Plan:
    """The plan of one generation of ``preset`` at this size (its family's released models, or its tiny ones). Its
    models are built once on ``meta`` here, to learn their names and architectures; a ``ValueError`` says why a
    preset cannot be planned (no released configuration, no tiny components, a model no step declares)."""
    entry = get_model_entry(preset)
    family = get_family(entry.family)
    plan = Plan(family.get_preset(entry.name), family, family.pipeline_class(), height, width, frames, tiny, (), ())
    if tiny and family.build_tiny_components is None:
        raise ValueError(f"{entry.name}: family {family.id!r} declares no build_tiny_components; nothing to run")
    with _bf16_on(torch.device("meta")):
        modules = plan.build()
    pipeline = plan.pipeline
    components: list[Component] = []
    keys: dict[tuple, str] = {}
    for name, module in modules.items():
        role = pipeline.preset_components.get(name, name)
        if role not in pipeline.component_names:
            raise ValueError(f"{entry.name}: component {name!r} is no component of {pipeline.__name__}")
        components.append(Component(name, role, keys.setdefault(_architecture(module), role)))
    phases = step_phases(pipeline, tuple(components))
    unused = [c.name for c in components if not any(c in phase.components for phase in phases)]
    if unused:
        raise ValueError(f"{entry.name}: no @pipeline_step of {pipeline.__name__} declares {', '.join(unused)}")
    return replace(plan, components=tuple(components), phases=phases)


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


def build_models(plan: Plan, device: torch.device) -> dict[str, nn.Module]:
    """One model per key (by ``Component.key``), in eval mode on the CPU: built together on ``device`` (random
    init on a GPU takes seconds), or on the CPU when together they do not fit."""
    try:
        with _bf16_on(device):
            modules = plan.build()
    except torch.cuda.OutOfMemoryError:
        modules = None  # built again below, once this frame no longer holds the partial build
    if modules is None:
        _free(device)
        print(f"memory.py: {plan.preset.name}'s models do not fit together; building them on the CPU", flush=True)
        with _bf16_on(torch.device("cpu")):
            modules = plan.build()
    kept: dict[str, nn.Module] = {}
    for component in plan.components:  # a second model of one architecture (A14B's low-noise expert) is dropped
        module = modules.pop(component.name)
        if component.key not in kept:
            kept[component.key] = module.eval().to("cpu")
        del module
    _free(device)
    return kept


def measure_component(
    plan: Plan, component: Component, module: nn.Module, setting: str, device: torch.device
) -> dict[str, int]:
    """Weights on the device after loading ``module`` (on the CPU; the caller holds no other reference) and the
    peak while it runs, in bytes above the start."""
    _free(device)
    cuda = device.type == "cuda"
    start = torch.cuda.memory_allocated(device) if cuda else 0
    config = SETTING_CONFIGS[setting]
    handle = None
    if config is None:
        module.to(device)
    else:
        handle = enable_vram_management(module, VRAMConfig(computation_device=device, **config))
        handle.onload()
    weights = torch.cuda.memory_allocated(device) - start if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        output = plan.run(component, module, device)
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


def combine(setting: str, plan: Plan, measured: dict[str, dict[str, int]]) -> int:
    """A generation's peak from per-model measurements, under the setting's rule of who shares the GPU."""
    context = max(m["context_bytes"] for m in measured.values())

    def excess(name: str) -> int:
        return measured[name]["peak_reserved_bytes"] - measured[name]["weights_bytes"]

    def weights(names: list[str]) -> int:
        return sum(measured[name]["weights_bytes"] for name in names)

    if setting == "resident":  # every model, each expert of a pair included
        names = [c.key for c in plan.components]
        return weights(names) + max(excess(n) for n in names) + context
    peaks = []
    for phase in plan.phases:
        names = [c.key for c in phase.components]
        peaks.append(weights(names) + max(excess(n) for n in names))
    return max(peaks) + context


def measure(plan: Plan, setting: str, device: torch.device) -> dict[str, object]:
    """One record of ``measured_memory.json``: a preset under a setting at a size, on this device."""
    began = time.perf_counter()
    record: dict[str, object] = {
        "preset": plan.preset.name,
        "setting": setting,
        "height": plan.height,
        "width": plan.width,
        "frames": plan.frames,
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if plan.tiny:
        record["tiny"] = True
    measured: dict[str, dict[str, int]] = {}
    oom = None
    try:
        models = build_models(plan, device)
        for component in plan.components:
            if component.key not in measured:
                measured[component.key] = measure_component(
                    plan, component, models.pop(component.key), setting, device
                )
    except torch.cuda.OutOfMemoryError as error:  # too large for this GPU: recorded, and the sweep goes on
        oom = str(error).splitlines()[0]
    models = None
    _free(device)
    if oom is not None:
        record.update(status="oom", peak_bytes=None, error=oom)
    else:
        record.update(status="ok", peak_bytes=combine(setting, plan, measured))
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


def make_plans(args: argparse.Namespace) -> list[Plan] | None:
    """The plan of each preset asked for, at its default size or the one given; None (after saying why) when one
    cannot be planned, except with ``--models all``, which skips it."""
    every = args.models == ["all"]
    names = [e.name for e in list_models() if e.components] if every else args.models
    plans: list[Plan] = []
    for name in names:
        try:
            entry = get_model_entry(name)
            tiny_size = TINY_SIZE[entry.kind]
            height = args.height or (tiny_size[0] if args.tiny else entry.height)
            width = args.width or (tiny_size[1] if args.tiny else entry.width)
            frames = (args.frames or (tiny_size[2] if args.tiny else entry.frames)) if entry.kind != "image" else 1
            plans.append(build_plan(entry.name, height, width, frames, args.tiny))  # on meta: checks it early
        except ValueError as error:
            print(f"memory.py: {'skipping: ' if every else ''}{error}", file=sys.stderr)
            if every:
                continue
            return None
    return plans


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
    plans = make_plans(args)
    if plans is None:
        return 2
    if args.dry_run:
        for plan in plans:
            steps = "; ".join(f"{p.name}: {', '.join(c.name for c in p.components)}" for p in plan.phases)
            size = f"{plan.height}x{plan.width}x{plan.frames}"
            for setting in args.settings:
                print(f"{plan.preset.name:22} {setting:8} {size}  {steps}")
        print(f"-> {args.output}")
        return 0
    if device.type == "cuda":
        torch.cuda.init()
        warm = torch.ones(256, 256, device=device, dtype=torch.bfloat16)
        (warm @ warm).sum().item()  # cuBLAS handle and workspace: part of every run's context
        del warm
    records = []
    for plan in plans:
        for setting in args.settings:
            record = measure(plan, setting, device)
            peak = record["peak_bytes"]
            shown = "oom" if peak is None else f"{peak / 1024**3:.2f} GiB"
            size = f"{plan.height}x{plan.width}x{plan.frames}"
            print(f"{plan.preset.name:22} {setting:8} {size}  {shown:>10}  {record['seconds']:6.1f} s", flush=True)
            records.append(record)
            write_records(args.output, records)  # after each row: a killed run keeps what it measured
    print(f"{len(records)} records -> {args.output} ({records[0]['gpu'] if records else device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
