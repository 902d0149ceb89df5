"""What a user asks of ds-vram: where weights are stored, in which dtype, and where they are computed."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch

__all__ = ["FP8_DTYPES", "VRAMConfig", "resolve_device", "resolve_dtype"]

Storage = Literal["device", "cpu", "disk"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "e4m3fn": torch.float8_e4m3fn,
    "e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "float8_e5m2": torch.float8_e5m2,
    "e5m2": torch.float8_e5m2,
}
STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, *FP8_DTYPES)
COMPUTATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def resolve_dtype(value: torch.dtype | str, argument: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    """Turn ``"bf16"``, ``"torch.float8_e4m3fn"`` or a dtype into a dtype, or explain what is accepted."""
    dtype = value
    if isinstance(value, str):
        dtype = _DTYPE_NAMES.get(value.lower().removeprefix("torch."))
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{argument}={value!r} is not supported; use one of: {names}")
    return dtype


def resolve_device(value: torch.device | str | None, argument: str = "computation_device") -> torch.device:
    """Parse a device and check that this machine has it, so a typo fails at configuration, not mid-forward."""
    if value is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{argument}={value!r} is not a device ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{argument}={value!r} asks for CUDA, but this machine has no CUDA GPU; use 'cpu'")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"{argument}={value!r}: only {torch.cuda.device_count()} CUDA device(s) are present")
        return torch.device("cuda", index)
    if device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{argument}={value!r}: device type {device.type!r} is not supported")
    return device


@dataclass(frozen=True)
class VRAMConfig:
    """Where a module's weights live between uses and how they are computed.

    storage: ``"device"`` keeps every weight on the computation device (only the dtype is managed), ``"cpu"``
        keeps them in CPU RAM (pinned when computing on CUDA, so copies run asynchronously), ``"disk"`` reads
        them from a weight source (a safetensors file) when a layer runs.
    storage_dtype: dtype weights are stored in; ``None`` means the computation dtype. FP8 dtypes
        (``"fp8"``/e4m3fn, ``"e5m2"``) apply to Linear, Conv and Embedding weights; other tensors keep the
        computation dtype, since they are small and sensitive.
    computation_device / computation_dtype: where and in what dtype each layer computes; weights are cast
        layer by layer at compute time. ``None`` device means CUDA when present, else CPU.
    vram_limit: GiB of managed weights kept resident on the computation device (counted in storage bytes,
        deterministically). Layers beyond it are streamed in, in execution order. ``None``: no limit.
    prefetch: how many streamed layers are fetched ahead on a CUDA side stream.
    fp8_scaling: ``"channel"`` keeps one scale per output channel (the default; lowest error), ``"tensor"``
        one per tensor, ``"none"`` a plain saturating cast.
    fp8_matmul: compute Linear layers with FP8 matmul (``torch._scaled_mm``); needs a CUDA GPU of compute
        capability 8.9 or newer and e4m3fn storage.
    never_fp8: glob patterns of layer names (``"final_layer.*"``) that keep the computation dtype even when
        ``storage_dtype`` is FP8. A module may add its own in a ``ds_vram_never_fp8`` attribute.
    units: glob patterns of submodules managed as one layer (fetched and computed together). A module may
        add its own in a ``ds_vram_units`` attribute.
    exclude: glob patterns of layers left unmanaged: moved to the computation device as they are, trainable.
    pin_memory: pin CPU storage; ``None`` pins when the computation device is CUDA.
    """

    storage: Storage = "cpu"
    storage_dtype: torch.dtype | str | None = None
    computation_device: torch.device | str | None = None
    computation_dtype: torch.dtype | str = torch.bfloat16
    vram_limit: float | None = None
    prefetch: int = 2
    fp8_scaling: Literal["channel", "tensor", "none"] = "channel"
    fp8_matmul: bool = False
    never_fp8: tuple[str, ...] = field(default_factory=tuple)
    units: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    pin_memory: bool | None = None

    def resolved(self) -> VRAMConfig:
        """A copy with dtypes and device parsed and every field checked; raises a message naming the field."""
        if self.storage not in ("device", "cpu", "disk"):
            raise ValueError(f"storage={self.storage!r} is not supported; use 'device', 'cpu' or 'disk'")
        computation_dtype = resolve_dtype(self.computation_dtype, "computation_dtype", COMPUTATION_DTYPES)
        storage_dtype = computation_dtype
        if self.storage_dtype is not None:
            storage_dtype = resolve_dtype(self.storage_dtype, "storage_dtype", STORAGE_DTYPES)
        device = resolve_device(self.computation_device)
        if self.vram_limit is not None and (not isinstance(self.vram_limit, (int, float)) or self.vram_limit < 0):
            raise ValueError(f"vram_limit={self.vram_limit!r} must be a number of GiB >= 0, or None for no limit")
        if self.vram_limit is not None and self.storage == "device":
            raise ValueError(
                "vram_limit needs storage='cpu' or 'disk': with storage='device' every weight already lives on "
                "the computation device"
            )
        if not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"prefetch={self.prefetch!r} must be an integer >= 0")
        if self.fp8_scaling not in ("channel", "tensor", "none"):
            raise ValueError(f"fp8_scaling={self.fp8_scaling!r} is not supported; use 'channel', 'tensor' or 'none'")
        if self.fp8_matmul:
            _check_fp8_matmul(device, storage_dtype, computation_dtype)
        for name in ("never_fp8", "units", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"{name} must be a tuple of glob patterns (strings), got {value!r}")
        pin = self.pin_memory if self.pin_memory is not None else device.type == "cuda"
        return replace(
            self,
            storage_dtype=storage_dtype,
            computation_dtype=computation_dtype,
            computation_device=device,
            pin_memory=bool(pin and torch.cuda.is_available()),
            never_fp8=tuple(self.never_fp8),
            units=tuple(self.units),
            exclude=tuple(self.exclude),
        )

    @property
    def vram_limit_bytes(self) -> int | None:
        return None if self.vram_limit is None else int(self.vram_limit * 1024**3)


def _check_fp8_matmul(device: torch.device, storage_dtype: torch.dtype, computation_dtype: torch.dtype) -> None:
    if storage_dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_matmul=True needs storage_dtype float8_e4m3fn, got {storage_dtype}")
    if computation_dtype != torch.bfloat16:
        raise ValueError(
            f"fp8_matmul=True needs computation_dtype bfloat16 (row-wise scaled matmul), got {computation_dtype}"
        )
    if device.type != "cuda":
        raise RuntimeError(f"fp8_matmul=True needs a CUDA GPU of compute capability 8.9+; computation is on {device}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise RuntimeError(
            f"fp8_matmul=True needs compute capability 8.9+ (Ada, Hopper or newer); {device} has {capability}"
        )
