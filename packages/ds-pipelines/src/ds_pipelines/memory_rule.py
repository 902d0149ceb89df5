"""How much GPU memory one generation needs under each VRAM setting: a GPU measurement where recorded, else a rule.

Needs are ESTIMATES, by this rule (family-neutral: every number comes from a ``ModelEntry``):

    need = weights on the GPU + activations + 1 GiB (CUDA context, cuBLAS workspace, allocator slack)

where "weights on the GPU" depends on the setting:

- ``resident``: every component in the computation dtype stays on the GPU (no ds-vram management).
- ``offload``: weights in CPU RAM; the pipeline brings one model at a time (``storage="cpu"``): the largest
  component must fit.
- ``fp8``: as ``offload`` with FP8 storage (e4m3fn, per-channel scales) of Linear/Conv/Embedding weights.
- ``stream``: ``vram_limit=0``: layers are fetched as they run, ``prefetch`` (2) ahead, so about three of the
  largest layers are on the GPU at once.

and "activations" is the larger of the DiT's (tokens x the widest Linear output x 2 bytes x 3 live tensors) and
the VAE decoder's (3 KiB per output pixel and decoded frame, 4 frames at a time for video). The 3 KiB is
chosen so that FLUX.1 at 1024x1024 needs about 4.5 GiB above its weights, the gap between loaded and peak
memory that the Hugging Face quantization blog measured for FLUX.1-dev on an H100 (31.4 GB loaded, 36.2 GB
peak).

Measurements replace the rule wherever they exist: ``measured_memory.json`` beside this module (or the file named
by ``$DIFFSYNTH_MEASURED_MEMORY``) holds what ``benchmarks/memory.py`` recorded on a CUDA GPU for a preset, a
setting and an output size. ``memory_need`` returns the measured peak for exactly that preset, setting, height,
width and frame count, and the rule's estimate otherwise, and says which (``MemoryNeed.measured``/``source``).
Only CUDA measurements count (the benchmark's ``--device cpu --tiny`` smoke runs are ignored); a malformed file
gives a warning naming it and the estimates.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .sizing import ModelEntry

__all__ = [
    "BASE_OVERHEAD",
    "MEASURED_MEMORY_ENV",
    "MEASURED_MEMORY_FILE",
    "MEMORY_SETTINGS",
    "MemoryNeed",
    "VRAMSuggestion",
    "activation_bytes",
    "estimate_memory",
    "measured_memory_file",
    "memory_need",
    "rule_estimate",
    "suggest_vram",
]

GIB = 1024**3
MEMORY_SETTINGS = ("resident", "offload", "fp8", "stream")
BASE_OVERHEAD = 1 * GIB  # CUDA context, cuBLAS workspace, allocator slack
VAE_BYTES_PER_PIXEL = 3 * 1024  # decoder activations per output pixel and frame decoded at once
DIT_LIVE_TENSORS = 3  # the widest layer's input, output and one temporary
PREFETCH = 2  # ds-vram's default: layers fetched ahead while one computes
MEASURED_MEMORY_FILE = Path(__file__).with_name("measured_memory.json")
MEASURED_MEMORY_ENV = "DIFFSYNTH_MEASURED_MEMORY"  # another measurements file (a benchmark's --output)
ESTIMATED = "estimated"


@dataclass(frozen=True)
class VRAMSuggestion:
    """What to pass to ds-vram on a GPU of ``gpu_memory`` GiB, and why (``reason``)."""

    setting: str
    storage: str
    storage_dtype: str | None
    vram_limit: float | None
    estimate_bytes: int
    fits: bool
    reason: str

    def vram_config_kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``ds_vram.VRAMConfig`` (empty for ``resident``: no management needed)."""
        if self.setting == "resident":
            return {}
        return {"storage": self.storage, "storage_dtype": self.storage_dtype, "vram_limit": self.vram_limit}


def activation_bytes(
    entry: ModelEntry, height: int | None = None, width: int | None = None, frames: int | None = None
) -> int:
    """Estimated activation memory of one denoising step or of the VAE decode, whichever is larger."""
    height, width, frames = height or entry.height, width or entry.width, frames or entry.frames
    latent_frames = (frames - 1) // entry.temporal_compression + 1 if entry.kind == "video" else 1
    tokens = math.ceil(height * width * entry.tokens_per_pixel) * latent_frames + entry.text_tokens
    dit = tokens * entry.widest_layer * 2 * DIT_LIVE_TENSORS
    decoded_frames = min(frames, 4) if entry.kind == "video" else 1
    vae = height * width * decoded_frames * VAE_BYTES_PER_PIXEL
    return max(dit, vae)


@dataclass(frozen=True)
class MemoryNeed:
    """Peak GPU bytes of one generation (None: the model is unsized), and whether a GPU measured it.

    source: ``"measured on <GPU> (<date>)"`` or ``"estimated"``.
    """

    bytes: int | None
    measured: bool
    source: str


def rule_estimate(
    entry: ModelEntry, setting: str, height: int | None, width: int | None, frames: int | None
) -> int | None:
    if not entry.components:
        return None
    if setting == "resident":
        weights = sum(c.bf16_bytes for c in entry.components)
    elif setting == "offload":
        weights = max(c.bf16_bytes for c in entry.components)
    elif setting == "fp8":
        weights = max(c.fp8_bytes for c in entry.components)
    else:
        weights = (1 + PREFETCH) * max(c.largest_layer_bytes for c in entry.components)
    return weights + activation_bytes(entry, height, width, frames) + BASE_OVERHEAD


def measured_memory_file() -> Path:
    """The measurements file in use: ``$DIFFSYNTH_MEASURED_MEMORY`` when set, else the one shipped beside us."""
    return Path(os.environ.get(MEASURED_MEMORY_ENV) or MEASURED_MEMORY_FILE)


@lru_cache(maxsize=4)
def _read_measurements(path: str, mtime_ns: int, size: int) -> dict[tuple, tuple[int, str]]:
    """``(preset, setting, height, width, frames) -> (peak bytes, "measured on <GPU> (<date>)")`` of CUDA records.

    Cached per file version (mtime and size), so a benchmark writing the file mid-session is seen.
    """
    if size == 0:
        return {}
    try:
        records = json.loads(Path(path).read_text())["measurements"]
        if not isinstance(records, list):
            raise TypeError(f"'measurements' is a {type(records).__name__}, not a list")
        found: dict[tuple, tuple[int, str]] = {}
        for record in records:
            key = (record["preset"], record["setting"], int(record["height"]), int(record["width"]))
            key += (int(record["frames"]),)
            if record["device"] != "cuda" or record.get("tiny") or record["status"] != "ok":
                continue  # CPU smoke runs measure nothing; "oom" says only that it did not fit that GPU
            peak = int(record["peak_bytes"])
            if key not in found or peak > found[key][0]:  # two GPUs measured it: plan for the larger
                found[key] = (peak, f"measured on {record['gpu']} ({record.get('date', 'undated')})")
        return found
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        warnings.warn(f"{path}: malformed measured-memory file ({error!r}); using estimates", stacklevel=2)
        return {}


def _measurements() -> dict[tuple, tuple[int, str]]:
    path = measured_memory_file()
    try:
        stat = path.stat()
    except OSError:  # absent: no measurements yet
        return {}
    return _read_measurements(str(path), stat.st_mtime_ns, stat.st_size)


def memory_need(
    entry: ModelEntry, setting: str, height: int | None = None, width: int | None = None, frames: int | None = None
) -> MemoryNeed:
    """Peak GPU bytes of one generation under ``setting``: a CUDA measurement of this preset at exactly this size
    when one is recorded, else the rule's estimate (see the module docstring)."""
    if setting not in MEMORY_SETTINGS:
        raise ValueError(f"setting={setting!r} is not one of {', '.join(MEMORY_SETTINGS)}")
    size = (height or entry.height, width or entry.width, (frames or entry.frames) if entry.kind == "video" else 1)
    measured = _measurements().get((entry.name, setting, *size))
    if measured is not None:
        return MemoryNeed(measured[0], True, measured[1])
    return MemoryNeed(rule_estimate(entry, setting, height, width, frames), False, ESTIMATED)


def estimate_memory(
    entry: ModelEntry, setting: str, height: int | None = None, width: int | None = None, frames: int | None = None
) -> int | None:
    """Peak GPU bytes of one generation under ``setting``, measured where recorded, else estimated (see
    ``memory_need``, which also says which); None if the model is unsized."""
    return memory_need(entry, setting, height, width, frames).bytes


# The settings that keep whole models on the GPU, fastest first: (setting, storage, storage dtype, why it fits).
_WHOLE_MODEL_SETTINGS = (
    ("resident", "device", None, "everything fits"),
    ("offload", "cpu", None, "one model at a time fits in bf16"),
    ("fp8", "cpu", "fp8", "one model at a time fits in FP8"),
)


def suggest_vram(
    entry: ModelEntry,
    gpu_memory: float,
    height: int | None = None,
    width: int | None = None,
    frames: int | None = None,
) -> VRAMSuggestion:
    """The fastest setting whose need fits ``gpu_memory`` GiB: resident, offload, fp8, then FP8 with a
    ``vram_limit`` that fills what activations and the streaming buffer leave free.

    Needs are GPU measurements where recorded (``memory_need``); ``reason`` ends with "(measured on <GPU> ...)"
    or "(estimated)" for the setting it chose.
    """
    if gpu_memory <= 0:
        raise ValueError(f"gpu_memory={gpu_memory} must be a positive number of GiB")
    budget = int(gpu_memory * GIB)
    found = {setting: memory_need(entry, setting, height, width, frames) for setting in MEMORY_SETTINGS}
    needs = {setting: need.bytes for setting, need in found.items()}
    if needs["resident"] is None:
        raise ValueError(f"{entry.name}: no size is known for this model, so no setting can be suggested")
    gib = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
    for setting, storage, storage_dtype, what in _WHOLE_MODEL_SETTINGS:
        if needs[setting] <= budget:
            reason = f"{what}: {gib(needs[setting])} of {gib(budget)} ({found[setting].source})"
            return VRAMSuggestion(setting, storage, storage_dtype, None, needs[setting], True, reason)
    streaming = needs["stream"]
    spare = budget - streaming
    limit = max(0.0, math.floor(spare / GIB * 10) / 10)
    fits = spare >= 0
    reason = (
        f"streaming layers with {limit:.1f} GiB of FP8 weights resident; the rest ({gib(streaming)}) is "
        "activations, context and layers in flight"
        if fits
        else f"even streaming every layer needs about {gib(streaming)}, more than {gib(budget)}; "
        "lower the size or frame count"
    )
    reason += f" ({found['stream'].source})"
    return VRAMSuggestion("stream", "cpu", "fp8", limit, streaming + int(limit * GIB), fits, reason)
