"""Option types and checks that every command shares, so that one option means the same everywhere.

Argument types (``type=`` of ``add_argument``) refuse a bad value while parsing, so argparse names the option
and exits with code 2: counts and steps (``positive_int``), seeds (``seed_int``), numbers that must be finite
(``finite_float``, ``positive_float``, ...), prompts that must be UTF-8 (``utf8_text``) and ``--lora PATH[:SCALE]``
(``lora_spec``). What needs the model (a size's multiple, its memory need) is checked by ``check_size`` and
``check_size_fits`` before anything loads.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from pathlib import Path

from ds_cli.common import GIB, UsageError

# torch.Generator.manual_seed takes [-2**63, 2**64 - 1] and folds negatives into the upper half; we take the
# unsigned range only, so that a seed and the one recorded in an image's metadata are the same number.
MAX_SEED = 2**64 - 1
# Training derives per-process and per-epoch seeds from its seed (ds_train multiplies and adds to it), and seeds
# numpy with it: keep it to 32 bits so every derived seed fits the generator.
MAX_TRAIN_SEED = 2**32 - 1
# A model given as a folder or file cannot be sized before it loads: such a request must stay within this side and
# this many DiT tokens (16-pixel tokens; 8192 x 8192 pixels for an image), a conservative bound on what fits.
MAX_SIDE = 8192
MAX_TOKENS = (MAX_SIDE // 16) ** 2
SIZE_OPTIONS = {"height": "--height", "width": "--width", "frames": "--frames"}


def _number(value: str, kind: Callable[[str], float | int], what: str) -> float | int:
    try:
        number = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value} is not a finite number")
    return number


def finite_float(value: str) -> float:
    """Any finite number (guidance and LoRA scales may be negative); nan and inf are refused."""
    return _number(value, float, "a number")


def positive_float(value: str) -> float:
    number = finite_float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0, not {value}")
    return number


def non_negative_float(value: str) -> float:
    number = finite_float(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be a number of at least 0, not {value}")
    return number


def fraction(value: str) -> float:
    """A share in [0, 1) (caption dropout)."""
    number = finite_float(value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {value}")
    return number


def strength(value: str) -> float:
    """A denoising strength in (0, 1]."""
    number = finite_float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return number


def positive_int(value: str) -> int:
    """Counts, steps, sizes, ranks: an integer of at least 1."""
    number = _number(value, int, "an integer")
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, not {value}")
    return number


def non_negative_int(value: str) -> int:
    """Intervals where 0 means never (checkpoint and sample intervals, warm-up steps)."""
    number = _number(value, int, "an integer")
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 0, not {value}")
    return number


def _seed(value: str, largest: int, why: str) -> int:
    number = _number(value, int, "an integer")
    if not 0 <= number <= largest:
        raise argparse.ArgumentTypeError(f"a seed must be in [0, {largest}] ({why}), not {value}")
    return number


def seed_int(value: str) -> int:
    """A generation seed: what ``torch.Generator.manual_seed`` takes, unsigned."""
    return _seed(value, MAX_SEED, "2**64 - 1, the largest seed torch.Generator takes")


def train_seed_int(value: str) -> int:
    return _seed(value, MAX_TRAIN_SEED, "2**32 - 1: training derives more seeds from it")


def utf8_text(value: str) -> str:
    """A prompt: the command line's bytes must be UTF-8. Python keeps undecodable bytes as lone surrogates, which
    a tokenizer then refuses with a message about its input type; say which byte is wrong instead."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(value[error.start])
        byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        before = value[max(0, error.start - 20) : error.start].encode("utf-8", "backslashreplace").decode()
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8: {byte} at character {error.start + 1} (after {before!r}); re-encode the text as UTF-8"
        ) from None
    return value


def lora_spec(value: str) -> tuple[str, float]:
    """``PATH[:SCALE]``. A file named exactly ``value`` is taken whole (scale 1), and so is a value whose last
    ``:`` is followed by a path (a Windows drive, a folder name with ``:``); otherwise what follows the last
    ``:`` must be a finite number."""
    path, colon, scale = value.rpartition(":")
    if not colon or not path or Path(value).is_file() or "/" in scale or "\\" in scale:
        return value, 1.0
    try:
        number = float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value}: the scale {scale!r} after the last ':' is not a number (PATH[:SCALE], for example "
            f"{path}:0.8); no file is named {value!r} either"
        ) from None
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"{value}: the scale {scale} is not a finite number")
    return path, number


# ----------------------------------------------------------------------------------------------- sizes
def preset_entry(model: object, sizes: dict[str, int | None]) -> object | None:
    """The ``ds_pipelines.ModelEntry`` of ``model`` when it is a preset name or id and a size was asked for (the
    entries are built on first use, which takes seconds); None for a local folder or file, or the default size."""
    if model is None or all(value is None for value in sizes.values()) or Path(str(model)).exists():
        return None
    from ds_pipelines import get_model_entry

    try:
        return get_model_entry(str(model))
    except ValueError:  # not a preset: a folder or file, which the pipeline sizes once it has loaded it
        return None


def size_multiple(entry: object) -> int:
    """Pixels per DiT token side of a ``ds_pipelines.ModelEntry`` (VAE downsampling x patch): 16, or 32 for
    Wan2.2-TI2V-5B's VAE."""
    return round(1 / math.sqrt(entry.tokens_per_pixel))


def check_size(entry: object | None, sizes: dict[str, int | None], options: dict[str, str] | None = None) -> None:
    """Sizes a preset can make: ``height``/``width`` multiples of its token side, video ``frames`` of the form
    k * temporal compression + 1. ``sizes`` maps ``height``, ``width``, ``frames`` to the requested values (None:
    the model's default); ``options`` maps those names to their command-line spelling. Without an ``entry`` (a
    local model) the pipeline checks the multiple once it knows the model."""
    options = {**SIZE_OPTIONS, **(options or {})}
    if entry is None:
        return
    multiple = size_multiple(entry)
    for name in ("height", "width"):
        value = sizes.get(name)
        if value is not None and value % multiple:
            lower = value // multiple * multiple
            nearest = f"{lower} and {lower + multiple}" if lower else str(multiple)
            raise UsageError(
                f"{options[name]} {value}: {entry.name} needs a multiple of {multiple} pixels; the nearest valid "
                f"sizes are {nearest}"
            )
    frames, packed = sizes.get("frames"), entry.temporal_compression
    if frames is not None and entry.kind == "video" and (frames - 1) % packed:
        lower = (frames - 1) // packed * packed + 1
        raise UsageError(
            f"{options['frames']} {frames}: {entry.name} needs {packed}k+1 frames (the VAE packs {packed} frames per "
            f"latent after the first); the nearest valid counts are {lower} and {lower + packed}"
        )


def available_memory(device: str | None) -> tuple[int, str]:
    """Bytes free for one generation and where: CUDA free memory on a CUDA device, else the host's available RAM."""
    import torch

    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(name).type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(name))
        return free, f"{name} has {free / GIB:.1f} GiB free"
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None and hasattr(os, "sysconf"):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available or 0, f"the host has {(available or 0) / GIB:.1f} GiB of RAM available"


def _size_text(sizes: dict[str, int | None], options: dict[str, str]) -> str:
    return " ".join(f"{options[name]} {value}" for name, value in sizes.items() if value is not None)


def check_size_fits(
    entry: object | None,
    sizes: dict[str, int | None],
    device: str | None,
    tiled: bool = False,
    options: dict[str, str] | None = None,
) -> None:
    """Refuse, before anything loads, a size the model cannot make in the memory there is.

    A preset (``entry``) is sized by ``ds_pipelines.memory_need``: a request larger than the model's default size
    whose need, even with weights streamed, exceeds ``available_memory(device)`` is refused. A local model (no
    ``entry``), or a tiled decode (whose VAE memory the estimate does not model), gets the conservative bound
    ``MAX_SIDE`` per side and ``MAX_TOKENS`` DiT tokens instead."""
    options = {**SIZE_OPTIONS, **(options or {})}
    if all(value is None for value in sizes.values()):
        return
    if entry is not None and not tiled:
        _check_memory(entry, sizes, device, options)
        return
    height, width, frames = (sizes.get(name) or 0 for name in ("height", "width", "frames"))
    latent_frames = (frames - 1) // 4 + 1 if frames else 1
    tokens = math.ceil(height / 16) * math.ceil(width / 16) * latent_frames
    if max(height, width) > MAX_SIDE or tokens > MAX_TOKENS:
        what = "a tiled decode" if entry is not None else "a model given as a folder or file"
        raise UsageError(
            f"{_size_text(sizes, options)}: too large; for {what} the limit is {MAX_SIDE} pixels a side and "
            f"{MAX_TOKENS} DiT tokens ({MAX_SIDE}x{MAX_SIDE} for an image), since its memory need cannot be "
            f"estimated before it loads; {available_memory(device)[1]}"
        )


def _check_memory(entry: object, sizes: dict[str, int | None], device: str | None, options: dict[str, str]) -> None:
    from ds_pipelines import MEMORY_SETTINGS, memory_need

    height, width = sizes.get("height") or entry.height, sizes.get("width") or entry.width
    frames = (sizes.get("frames") or entry.frames) if entry.kind == "video" else 1
    if height * width * frames <= entry.height * entry.width * entry.frames:
        return  # the sizes a model is released for are not refused on an estimate
    needs = [memory_need(entry, setting, height, width, frames).bytes for setting in MEMORY_SETTINGS]
    need = min((n for n in needs if n is not None), default=None)
    if need is None:
        return
    free, where = available_memory(device)
    if need > free:
        default = f"{entry.height}x{entry.width}" + (f", {entry.frames} frames" if entry.kind == "video" else "")
        raise UsageError(
            f"{_size_text(sizes, options)}: {entry.name} needs about {need / GIB:.1f} GiB at this size even with its "
            f"weights streamed (estimated, see diffsynth vram --help), but {where}; its default size is {default}"
        )


def family_id(value: str) -> str:
    """An installed family's id (checked when given, so --help needs no family package)."""
    from ds_pipelines import list_families

    known = [family.id for family in list_families()]
    if value.strip().lower() not in known:
        raise argparse.ArgumentTypeError(f"unknown family {value!r}; installed: {', '.join(known) or 'none'}")
    return value.strip().lower()
