"""What ds-vram did with a module: where each layer lives, what it costs, and the peaks seen so far."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LayerReport", "VRAMReport"]


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


@dataclass(frozen=True)
class LayerReport:
    name: str
    kind: str
    storage: str  # "device", "cpu", "disk" or "excluded"
    dtype: str  # the dtype the layer is stored in on the computation device
    nbytes: int  # bytes it takes on the computation device when resident
    placement: str  # "resident" (kept within the budget), "streamed" (fetched per use) or "excluded"
    on_device: bool  # whether a copy is on the computation device now


@dataclass(frozen=True)
class VRAMReport:
    """Per-layer placement and byte counts; ``str()`` gives a table, the totals drive budget decisions."""

    device: str
    storage: str
    vram_limit_bytes: int | None
    layers: list[LayerReport] = field(default_factory=list)
    buffer_bytes: int = 0  # buffers, always on the computation device
    resident_bytes: int = 0  # managed weights kept resident, plus excluded weights and buffers
    streamed_bytes: int = 0  # managed weights fetched at each use
    on_device_bytes: int = 0  # what is on the computation device now
    peak_streamed_bytes: int = 0  # most bytes of streamed weights held at once so far
    peak_device_allocated_bytes: int | None = None  # torch's peak allocation on the CUDA device

    def __str__(self) -> str:
        limit = "none" if self.vram_limit_bytes is None else format_bytes(self.vram_limit_bytes)
        lines = [f"ds-vram on {self.device}: storage={self.storage}, vram_limit={limit}"]
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines.append(f"{'layer':<{width}}  {'kind':<10}  {'dtype':<14}  {'bytes':>10}  placement")
        for layer in self.layers:
            where = layer.placement + (" (on device)" if layer.on_device and layer.placement == "resident" else "")
            lines.append(
                f"{layer.name or '<root>':<{width}}  {layer.kind:<10}  {layer.dtype:<14}  "
                f"{format_bytes(layer.nbytes):>10}  {where}"
            )
        lines.append(
            f"resident {format_bytes(self.resident_bytes)} (buffers {format_bytes(self.buffer_bytes)}), "
            f"streamed {format_bytes(self.streamed_bytes)}, on device now {format_bytes(self.on_device_bytes)}, "
            f"peak streamed {format_bytes(self.peak_streamed_bytes)}"
        )
        if self.peak_device_allocated_bytes is not None:
            lines.append(f"peak CUDA allocation {format_bytes(self.peak_device_allocated_bytes)}")
        return "\n".join(lines)
