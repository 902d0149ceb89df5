"""The released models of every installed family, their sizes, and how much GPU memory each VRAM setting needs.

Sizes come from the released configurations built on the meta device (no weights, no download): parameter
counts and the bytes ds-vram stores (``ds_vram.estimate_weights``). Memory needs are ESTIMATES, by this rule:

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

import importlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from ds_vram import estimate_weights

__all__ = [
    "MEMORY_SETTINGS",
    "ComponentSize",
    "MemoryNeed",
    "ModelEntry",
    "VRAMSuggestion",
    "download_model",
    "estimate_memory",
    "get_model_entry",
    "list_models",
    "memory_need",
    "pipeline_for",
    "preset_defaults",
    "suggest_vram",
]

logger = logging.getLogger(__name__)

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
class ComponentSize:
    """One model of a pipeline: parameters, bytes in bf16 and in FP8 storage, the largest layer in bf16."""

    name: str
    parameters: int
    bf16_bytes: int
    fp8_bytes: int
    largest_layer_bytes: int


@dataclass(frozen=True)
class ModelEntry:
    """A released model as the CLI and notebooks list it.

    kind: ``"image"`` or ``"video"``. height/width/frames: the default output size (frames 1 for images).
    tokens_per_pixel: DiT tokens per output pixel and latent frame (1/256 for 16-pixel patches).
    temporal_compression: video frames per latent frame (1 for images). text_tokens: tokens added to the DiT
    sequence by the prompt (FLUX's joint attention; 0 where text enters through cross-attention).
    widest_layer: the largest Linear output width of the DiT (drives activation memory).
    """

    name: str
    family: str
    kind: str
    model_id: str
    pipeline: str
    components: tuple[ComponentSize, ...] = field(repr=False)
    height: int = 1024
    width: int = 1024
    frames: int = 1
    steps: int = 30
    tokens_per_pixel: float = 1 / 256
    temporal_compression: int = 1
    text_tokens: int = 0
    widest_layer: int = 0

    @property
    def parameters(self) -> int:
        return sum(c.parameters for c in self.components)

    @property
    def bf16_bytes(self) -> int:
        return sum(c.bf16_bytes for c in self.components)


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


# ---------------------------------------------------------------------------------------------- sizing
def _size(name: str, module: nn.Module) -> ComponentSize:
    bf16 = estimate_weights(module)
    fp8 = estimate_weights(module, "fp8")
    return ComponentSize(name, bf16.parameter_count, bf16.total_bytes, fp8.total_bytes, bf16.largest_layer_bytes)


def _widest_linear(module: nn.Module) -> int:
    return max((m.out_features for m in module.modules() if isinstance(m, nn.Linear)), default=0)


def _flux_text_encoder_configs() -> dict[str, object]:
    """CLIP-L text model and T5-XXL encoder configs at the sizes every FLUX.1 release ships (benchmarks build them
    on a GPU; ``_flux_text_encoders`` on meta)."""
    from transformers import CLIPTextConfig, T5Config

    clip = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    t5 = T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    return {"text_encoder": clip, "text_encoder_2": t5}


def _flux_text_encoders() -> dict[str, nn.Module]:
    """CLIP-L text model and the T5-XXL encoder on the meta device."""
    from transformers import CLIPTextModel, T5EncoderModel

    configs = _flux_text_encoder_configs()
    with torch.device("meta"):
        return {
            "text_encoder": CLIPTextModel(configs["text_encoder"]),
            "text_encoder_2": T5EncoderModel(configs["text_encoder_2"]),
        }


def _flux_entries() -> list[ModelEntry]:
    from ds_models_flux import PRESETS, FluxDiT, FluxDiTConfig, FluxVAE, FluxVAEConfig

    encoders = {name: _size(name, module) for name, module in _flux_text_encoders().items()}
    with torch.device("meta"):
        vae = _size("vae", FluxVAE(FluxVAEConfig.flux1()))
    entries = []
    for preset in PRESETS.values():
        try:
            config = FluxDiTConfig.preset(preset.dit_config)
        except (ValueError, AttributeError, TypeError):
            entry = _entry_from_files("flux", preset)  # e.g. a shipped demo model: size it from its files
            if entry is not None:
                entries.append(entry)
            continue
        with torch.device("meta"):
            dit_module = FluxDiT(config)
        components = (_size("dit", dit_module), vae, encoders["text_encoder"], encoders["text_encoder_2"])
        entries.append(
            ModelEntry(
                preset.name,
                "flux",
                "image",
                preset.model_id,
                "FluxImagePipeline",
                components,
                steps=preset.steps,
                text_tokens=preset.t5_sequence_length,
                widest_layer=_widest_linear(dit_module),
            )
        )
    return entries


def _local_paths(preset: object) -> list[Path] | None:
    configs = preset.model_configs() if hasattr(preset, "model_configs") else {}
    paths = []
    for config in configs.values():
        path = getattr(config, "path", None)
        if path is None:
            return None
        paths.extend(Path(p) for p in ([path] if isinstance(path, (str, Path)) else path))
    return paths or None


def _entry_from_files(family: str, preset: object) -> ModelEntry | None:
    """A preset whose files are local (a shipped demo model): sizes from its checkpoint headers."""
    from ds_loader import inspect_checkpoint

    paths = _local_paths(preset)
    if not paths:
        return None
    components = []
    for path in paths if all(p.exists() for p in paths) else []:  # missing files (a demo not built yet): no sizes
        if path.is_dir() and path.name.startswith("tokenizer"):
            continue
        for entry in inspect_checkpoint(path).entries:
            stored = entry.parameter_count * 2  # bf16; no layer structure in headers: conservative
            name = entry.component or path.stem
            components.append(ComponentSize(name, entry.parameter_count, stored, stored, stored))
    return ModelEntry(
        preset.name,
        family,
        "image",
        getattr(preset, "model_id", "") or str(paths[0].parent),
        "FluxImagePipeline",
        tuple(components),
        height=getattr(preset, "height", 1024) or 1024,
        width=getattr(preset, "width", 1024) or 1024,
        steps=getattr(preset, "steps", 30),
    )


def _wan_entries() -> list[ModelEntry]:
    """Wan presets, sized when the family exposes its configs (``WanDiTConfig``, ``WanVAE``)."""
    wan = importlib.import_module("ds_models_wan")
    presets = getattr(wan, "PRESETS", {})
    entries = []
    for name, preset in presets.items():
        components: list[ComponentSize] = []
        widest = 0
        try:
            components, widest = _wan_components(wan, preset)
        except (ImportError, AttributeError, ValueError, TypeError) as error:  # a family still being built: no sizes
            logger.debug("cannot size Wan preset %s: %s", name, error)
        height, width = getattr(preset, "height", None) or 480, getattr(preset, "width", None) or 832
        entries.append(
            ModelEntry(
                name,
                "wan",
                "video",
                getattr(preset, "model_id", "") or "",
                "WanVideoPipeline",
                tuple(components),
                height=height,
                width=width,
                frames=getattr(preset, "num_frames", 81) or 81,
                steps=getattr(preset, "steps", 50) or 50,
                tokens_per_pixel=1 / (4 * (16 if "ti2v" in str(name) else 8) ** 2),  # 2x2 patches of latents
                temporal_compression=4,
                widest_layer=widest,
            )
        )
    return entries


def _wan_components(wan: object, preset: object) -> tuple[list[ComponentSize], int]:
    """Sizes of a Wan release from its configs on meta: the DiT(s), the VAE, umT5-XXL and (I2V) CLIP ViT-H/14."""
    dit_module = importlib.import_module("ds_models_wan.dit")
    with torch.device("meta"):
        dit = dit_module.WanDiT(dit_module.WanDiTConfig.preset(preset.dit_config))
    names = _component_names(preset)
    dits = [c for c in ("dit", "dit_high_noise", "dit_low_noise") if c in names] or ["dit"]
    components = [_size(c, dit) for c in dits]  # the A14B experts share one architecture
    if preset.vae_config == "wan2.2":
        vae_module = importlib.import_module("ds_models_wan.vae22")
        vae_class, vae_config = vae_module.WanVAE22, vae_module.WanVAE22Config.preset("wan2.2")
    else:
        vae_module = importlib.import_module("ds_models_wan.vae")
        vae_class, vae_config = vae_module.WanVAE, vae_module.WanVAEConfig.preset(preset.vae_config)
    text = importlib.import_module("ds_models_wan.text_encoder")
    with torch.device("meta"):
        components.append(_size("vae", vae_class(vae_config)))
        components.append(_size("text_encoder", text.build_umt5_encoder(text.umt5_xxl_config())))
        if "image_encoder" in names:
            image = importlib.import_module("ds_models_wan.image_encoder")
            components.append(_size("image_encoder", image.build_clip_vision_model(image.clip_vit_h14_config())))
    return components, _widest_linear(dit)


def _component_names(preset: object) -> tuple[str, ...]:
    for attribute in ("files", "components"):
        value = getattr(preset, attribute, None)
        if value:
            return tuple(value)
    return ()


_FAMILIES: dict[str, Callable[[], list[ModelEntry]]] = {"flux": _flux_entries, "wan": _wan_entries}
_CACHE: dict[str, list[ModelEntry]] = {}


def list_models(families: tuple[str, ...] | None = None) -> list[ModelEntry]:
    """Every preset of every installed family (a family package that is not installed is skipped)."""
    entries = []
    for family, build in _FAMILIES.items():
        if families is not None and family not in families:
            continue
        if family not in _CACHE:
            try:
                _CACHE[family] = build()
            except ModuleNotFoundError as error:
                logger.debug("family %s is not installed: %s", family, error)
                _CACHE[family] = []
        entries.extend(_CACHE[family])
    return entries


def get_model_entry(name: str) -> ModelEntry:
    """A listed model by preset name or model id (case-insensitive)."""
    key = name.strip().lower()
    entries = list_models()
    for entry in entries:
        if key in (entry.name.lower(), entry.model_id.lower()):
            return entry
    known = ", ".join(entry.name for entry in entries)
    raise ValueError(f"unknown model {name!r}; known presets: {known}")


# ---------------------------------------------------------------------------------------------- memory
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


def _rule_estimate(
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
    return MemoryNeed(_rule_estimate(entry, setting, height, width, frames), False, ESTIMATED)


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


# ---------------------------------------------------------------------------------------------- which pipeline
# family -> (family package, pipeline class in ds_pipelines, "image" | "video")
PIPELINES = {
    "flux": ("ds_models_flux", "FluxImagePipeline", "image"),
    "wan": ("ds_models_wan", "WanVideoPipeline", "video"),
}
DEFAULT_MODEL = "demo-digits"


def _family_of_preset(key: str) -> str | None:
    for family, (package, _, _) in PIPELINES.items():
        try:
            presets = getattr(importlib.import_module(package), "PRESETS", {})
        except ModuleNotFoundError:
            continue
        ids = {str(getattr(preset, "model_id", "")).lower() for preset in presets.values()}
        if key in {name.lower() for name in presets} or key in ids:
            return family
    return None


# diffusers class-name prefixes in model_index.json / transformer/config.json, for folders in diffusers layout
_DIFFUSERS_CLASSES = {"Wan": "wan", "Flux": "flux"}


def _family_of_diffusers_folder(path: Path) -> str | None:
    for name in ("model_index.json", "transformer/config.json"):
        try:
            class_name = json.loads((path / name).read_text()).get("_class_name", "")
        except (OSError, ValueError, AttributeError):
            continue
        for prefix, family in _DIFFUSERS_CLASSES.items():
            if class_name.startswith(prefix):
                return family
    return None


def _family_of_files(path: Path) -> str | None:
    from ds_loader import LoaderError, detect

    if path.is_dir():
        family = _family_of_diffusers_folder(path)
        if family is not None:
            return family

    if path.is_file():
        files = [path]
    else:
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*/*.safetensors"))
        files += sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file())
    families = set()
    for file in files[:16]:  # headers only; enough to tell a family apart
        try:
            families.update(match.spec.family for match in detect(file))
        except (LoaderError, OSError, ValueError):
            continue
    for family in PIPELINES:  # a video family outranks the image components it may share
        if family in families and PIPELINES[family][2] == "video":
            return family
    return next((family for family in PIPELINES if family in families), None)


def pipeline_for(model: str | os.PathLike | None) -> tuple[str, str]:
    """``(pipeline class name, "image" | "video")`` for a preset name, a model id, a local folder or file.

    Presets and ids are looked up in each installed family; local files are recognised by ds-loader detection
    (headers only). Anything else is FLUX.1's, whose ``from_pretrained`` then says what is wrong with it.
    """
    family = None
    if model is not None:
        key = str(model).strip().lower()
        family = _family_of_preset(key)
        if family is None and Path(model).exists():
            family = _family_of_files(Path(model))
    _, class_name, kind = PIPELINES[family or "flux"]
    return class_name, kind


def preset_defaults(model: str | os.PathLike | None) -> dict[str, object]:
    """Call options a preset is usually run with (steps, embedded guidance, size, frames), as keyword arguments
    of its pipeline's ``__call__``; empty for anything that is not a preset name."""
    key = str(model if model is not None else DEFAULT_MODEL).strip().lower()
    family = _family_of_preset(key)
    if family is None:
        return {}
    package = importlib.import_module(PIPELINES[family][0])
    try:
        preset = package.get_preset(key)
    except ValueError:  # a model id rather than a name
        preset = next(p for p in package.PRESETS.values() if str(getattr(p, "model_id", "")).lower() == key)
    fields = {
        "steps": "num_inference_steps",
        "guidance": "embedded_guidance",
        "cfg_scale": "cfg_scale",
        "height": "height",
        "width": "width",
        "num_frames": "num_frames",
        "sigma_shift": "sigma_shift",
    }
    defaults = {argument: getattr(preset, name) for name, argument in fields.items() if hasattr(preset, name)}
    size = getattr(preset, "default_size", None)
    if size:
        defaults["height"], defaults["width"] = size
    return {name: value for name, value in defaults.items() if value is not None}


# ---------------------------------------------------------------------------------------------- download
def download_model(name: str, download_source: str | None = None) -> dict[str, list[Path]]:
    """Fetch every component of a preset through ds-loader (files already present are kept); local paths."""
    entry = get_model_entry(name)
    family = importlib.import_module(f"ds_models_{entry.family}")
    preset = family.get_preset(entry.name)
    configs = preset.model_configs(download_source)
    result = {}
    for component, config in configs.items():
        logger.info("%s: %s", component, config)
        result[component] = config.resolve()
    return result
