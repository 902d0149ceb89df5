"""Attach VRAM management to any module from outside: discover its layers, store them, stream them.

The module keeps its classes and its code. Each managed layer gets an instance-level ``forward`` that asks
the handle for its tensors on the computation device, computes, and lets streamed copies go. Model-level
``onload``/``offload`` and layer-level streaming are the same mechanism: a layer within the budget keeps
its fetched copy until ``offload``; any other layer fetches one per call, prefetched in execution order.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Mapping

import torch
from torch import nn

from .config import FP8_DTYPES, VRAMConfig
from .fp8 import quantize_fp8
from .layers import (
    FP8_KINDS,
    ManagedLayer,
    StoredTensor,
    TensorEntry,
    compute_conv,
    compute_embedding,
    compute_generic,
    compute_linear,
    compute_norm,
    layer_kind,
)
from .lora import LoraAdapter, check_lora_shapes
from .report import LayerReport, VRAMReport
from .sources import WeightSource

__all__ = ["VRAMHandle", "enable_vram_management", "get_vram_handle"]

_HANDLE_ATTRIBUTE = "_ds_vram_handle"


def enable_vram_management(
    module: nn.Module, config: VRAMConfig | None = None, weights: WeightSource | None = None
) -> VRAMHandle:
    """Manage ``module``'s weights as ``config`` says; returns the handle that reports, moves and undoes it.

    ``weights`` is a lazy source of the module's tensors, keyed by parameter name relative to ``module``;
    it is required for ``storage="disk"``, where the module may have been built on the meta device.
    Layers fetch lazily: the first forward brings the resident set to the computation device (``onload``
    does it ahead of time) and learns the execution order that streaming prefetches in.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"enable_vram_management needs a torch.nn.Module, got {type(module).__name__}")
    if getattr(module, _HANDLE_ATTRIBUTE, None) is not None:
        raise RuntimeError(f"{type(module).__name__} is already managed by ds-vram; call handle.disable() first")
    config = (config or VRAMConfig()).resolved()
    if config.storage == "disk" and weights is None:
        raise ValueError(
            "storage='disk' needs a weight source to read layers from: pass weights=SafetensorsSource(path)"
        )
    if weights is not None and not isinstance(weights, WeightSource):
        raise TypeError(
            "weights must implement ds_vram.WeightSource (keys, __contains__, info, get); "
            f"got {type(weights).__name__}"
        )
    return VRAMHandle(module, config, weights)


def get_vram_handle(module: nn.Module) -> VRAMHandle | None:
    """The handle managing ``module``, or None: how pipelines find what to onload and offload."""
    return getattr(module, _HANDLE_ATTRIBUTE, None)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class VRAMHandle:
    """The management of one module: ``report()``, ``onload()``, ``offload()``, LoRA adapters, ``disable()``."""

    def __init__(self, module: nn.Module, config: VRAMConfig, weights: WeightSource | None):
        self.module = module
        self.config = config
        self.weights = weights
        self.device: torch.device = config.computation_device
        self.dtype: torch.dtype = config.computation_dtype
        self._units = config.units + tuple(getattr(module, "ds_vram_units", ()))
        self._never_fp8 = config.never_fp8 + tuple(getattr(module, "ds_vram_never_fp8", ()))
        self.layers: list[ManagedLayer] = []
        self.excluded: dict[str, nn.Module] = {}
        self._layers_by_name: dict[str, ManagedLayer] = {}
        self._stream = _Streamer(self)
        self._buffer_bytes = 0
        self._excluded_bytes = 0
        self._discover()
        self._validate()  # everything is checked before the module is changed
        self._load_excluded_and_buffers()
        for layer in self.layers:
            self._store(layer)
        self._plan_residency()
        self._hooks = [
            module.register_forward_pre_hook(self._stream.begin_forward),
            module.register_forward_hook(self._stream.end_forward, always_call=True),
        ]
        for layer in self.layers:
            layer.module.forward = functools.partial(self._forward, layer)
        setattr(module, _HANDLE_ATTRIBUTE, self)

    # ----------------------------------------------------------------- discovery and storage
    def _discover(self) -> None:
        aliases: dict[int, list[str]] = {}
        for name, parameter in self.module.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(parameter), []).append(name)
        seen: set[int] = set()

        def visit(prefix: str, module: nn.Module) -> None:
            if id(module) in seen:
                return
            seen.add(id(module))
            if prefix and _matches(prefix, self.config.exclude):
                self.excluded[prefix] = module
                return
            unit = bool(prefix) and _matches(prefix, self._units)
            if any(p is not None for p in module._parameters.values()) or (
                unit and next(module.parameters(), None) is not None
            ):
                self._add_layer(prefix, module, unit, aliases)
            if unit:
                return
            for child_name, child in module.named_children():
                visit(_join(prefix, child_name), child)

        visit("", self.module)

    def _add_layer(self, name: str, module: nn.Module, unit: bool, aliases: dict[int, list[str]]) -> None:
        kind = "generic" if unit else layer_kind(module)
        fp8 = self.config.storage_dtype in FP8_DTYPES and kind in FP8_KINDS and not _matches(name, self._never_fp8)
        entries = []
        owners = module.named_modules(remove_duplicate=False) if unit else [("", module)]
        for owner_name, owner in owners:
            for attribute, parameter in owner._parameters.items():
                if parameter is None:
                    continue
                relative = _join(owner_name, attribute)
                keys = tuple(aliases.get(id(parameter), [_join(name, relative)]))
                entries.append(
                    TensorEntry(
                        owner,
                        attribute,
                        relative,
                        keys,
                        parameter.shape,
                        fp8 and attribute == "weight",
                        parameter.requires_grad,
                    )
                )
        layer = ManagedLayer(name, module, kind, entries, module.forward, "forward" in module.__dict__)
        self.layers.append(layer)
        self._layers_by_name[name] = layer

    def _source_key(self, entry: TensorEntry) -> str | None:
        return next((key for key in entry.keys if key in self.weights), None)

    def _validate(self) -> None:
        if self.config.storage == "disk":
            self._validate_source()
        else:
            for layer in self.layers:
                for entry in layer.entries:
                    if entry.owner._parameters[entry.attribute].is_meta:
                        raise ValueError(
                            f"parameter {entry.keys[0]!r} is on the meta device; use storage='disk' with a weight "
                            "source, or load the weights first"
                        )
        for prefix, module in self.module.named_modules():
            for name, buffer in module._buffers.items():
                key = _join(prefix, name)
                if buffer is not None and buffer.is_meta and (self.weights is None or key not in self.weights):
                    raise KeyError(
                        f"buffer {key!r} is on the meta device and the weight source has no such key; "
                        "build the module on the CPU or give a source that holds it"
                    )

    def _validate_source(self) -> None:
        missing, mismatched = [], []
        for layer in self.layers:
            for entry in layer.entries:
                key = self._source_key(entry)
                if key is None:
                    missing.append(f"{entry.keys[0]} (layer {layer.name or '<root>'!r})")
                elif tuple(self.weights.info(key).shape) != tuple(entry.shape):
                    shape = tuple(self.weights.info(key).shape)
                    mismatched.append(f"{key}: source {shape}, layer {layer.name!r} expects {tuple(entry.shape)}")
        if missing or mismatched:
            parts = [f"the weight source {self.weights!r} does not fit {type(self.module).__name__}:"]
            for title, items in (("missing keys", missing), ("wrong shapes", mismatched)):
                if items:
                    more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
                    parts.append(f"{len(items)} {title}: " + "; ".join(items[:10]) + more)
            raise KeyError("\n".join(parts))

    def _read(self, keys: tuple[str, ...], what: str) -> torch.Tensor:
        key = next((k for k in keys if self.weights is not None and k in self.weights), None)
        if key is None:
            raise KeyError(f"{what} {keys[0]!r} is on the meta device and the weight source has no such key")
        return self.weights.get(key)

    def _load_excluded_and_buffers(self) -> None:
        """Excluded layers and all buffers stay on the computation device as they are (buffers are small)."""
        for prefix, module in self.excluded.items():
            for name, parameter in list(module.named_parameters(recurse=True)):
                if parameter.is_meta:
                    owner_name, _, attribute = name.rpartition(".")
                    owner = module.get_submodule(owner_name)
                    data = self._read((_join(prefix, name),), "parameter")
                    owner._parameters[attribute] = nn.Parameter(data.to(parameter.dtype), parameter.requires_grad)
            module.to(self.device)
            self._excluded_bytes += sum(p.numel() * p.element_size() for p in module.parameters())
        for prefix, module in self.module.named_modules():
            for name, buffer in module._buffers.items():
                if buffer is None:
                    continue
                if buffer.is_meta:
                    buffer = self._read((_join(prefix, name),), "buffer").to(buffer.dtype)
                module._buffers[name] = buffer.to(self.device)
                self._buffer_bytes += buffer.numel() * buffer.element_size()

    def _store(self, layer: ManagedLayer) -> None:
        """Convert each parameter to its storage form and leave a placeholder on the module."""
        storage = self.config.storage
        stored: dict[str, StoredTensor] = {}
        layer.storage_bytes = 0
        for entry in layer.entries:
            dtype = self._entry_storage_dtype(entry)
            if storage == "disk":
                # Counted as it would sit on the device when resident; nothing is read now.
                numel = entry.shape.numel()
                layer.storage_bytes += numel * dtype.itemsize + (4 * entry.shape[0] if entry.fp8 else 0)
            else:
                parameter = entry.owner._parameters[entry.attribute]
                target = self.device if storage == "device" else torch.device("cpu")
                item = self._convert(parameter.detach().to(target), entry)
                if self.config.pin_memory and target.type == "cpu":
                    scale = None if item.scale is None else item.scale.pin_memory()
                    item = StoredTensor(item.data.pin_memory(), scale)
                stored[entry.relative_name] = item
                layer.storage_bytes += item.nbytes
            entry.owner._parameters[entry.attribute] = self._placeholder(entry, stored.get(entry.relative_name))
        layer.stored = None if storage == "disk" else stored
        layer.storage_dtype = self.config.storage_dtype if any(e.fp8 for e in layer.entries) else self.dtype

    def _entry_storage_dtype(self, entry: TensorEntry) -> torch.dtype:
        if entry.fp8:
            return self.config.storage_dtype
        return self.dtype if self.config.storage_dtype in FP8_DTYPES else self.config.storage_dtype

    def _convert(self, tensor: torch.Tensor, entry: TensorEntry) -> StoredTensor:
        if entry.fp8 and tensor.dtype not in FP8_DTYPES:
            return StoredTensor(*quantize_fp8(tensor, self.config.storage_dtype, self.config.fp8_scaling))
        if entry.fp8 or not tensor.is_floating_point():
            return StoredTensor(tensor)  # already FP8 in the file, or integer data: keep as is
        return StoredTensor(tensor.to(self._entry_storage_dtype(entry)))

    def _placeholder(self, entry: TensorEntry, stored: StoredTensor | None) -> nn.Parameter:
        # When the stored tensor is exactly what the layer computes with, the module keeps it (state_dict works);
        # otherwise a meta tensor with the computation dtype, so code that reads .dtype or .shape sees the truth.
        if stored is not None and stored.scale is None and stored.data.dtype == self.dtype:
            return nn.Parameter(stored.data, requires_grad=False)
        return nn.Parameter(torch.empty(entry.shape, dtype=self.dtype, device="meta"), requires_grad=False)

    def _plan_residency(self) -> None:
        limit = self.config.vram_limit_bytes
        used = self._buffer_bytes + self._excluded_bytes
        for layer in self.layers:
            layer.keep_resident = limit is None or used + layer.storage_bytes <= limit
            if layer.keep_resident:
                used += layer.storage_bytes
            if self.config.storage == "device":
                layer.resident = layer.stored

    # ----------------------------------------------------------------- fetching
    def fetch(self, layer: ManagedLayer) -> dict[str, StoredTensor]:
        """The layer's tensors on the computation device, in storage form (FP8 stays FP8 until compute)."""
        if layer.stored is not None:
            return {name: item.to(self.device, non_blocking=True) for name, item in layer.stored.items()}
        payload = {}
        for entry in layer.entries:
            key = self._source_key(entry)
            if key is None:
                raise KeyError(f"layer {layer.name!r}: the weight source has no key {entry.keys[0]!r}")
            tensor = self.weights.get(key)
            if tuple(tensor.shape) != tuple(entry.shape):
                raise ValueError(
                    f"layer {layer.name!r}: key {key!r} has shape {tuple(tensor.shape)}, expected {tuple(entry.shape)}"
                )
            if layer.keep_resident:
                # A resident copy is kept in the storage dtype; a streamed one stays as read until compute.
                item = self._convert(tensor.to(self.device, non_blocking=True), entry)
            else:
                item = StoredTensor(tensor.to(self.device, non_blocking=True))
            payload[entry.relative_name] = item
        return payload

    def acquire(self, layer: ManagedLayer) -> dict[str, StoredTensor]:
        if layer.resident is not None:
            self._stream.visit(layer)
            return layer.resident
        payload = self._stream.take(layer)
        if payload is None:
            payload = self.fetch(layer)
            self._stream.account(layer, payload)
        if layer.keep_resident:
            layer.resident = payload
            self._stream.release(payload)
        self._stream.visit(layer)
        return payload

    def _forward(self, layer: ManagedLayer, *args, **kwargs):
        payload = self.acquire(layer)
        try:
            if layer.kind == "linear":
                refetch = None if layer.keep_resident else functools.partial(self.fetch, layer)
                return compute_linear(layer, payload, args[0], self.dtype, self.config.fp8_matmul, refetch)
            if layer.kind == "conv":
                return compute_conv(layer, payload, args[0], self.dtype)
            if layer.kind == "embedding":
                return compute_embedding(layer, payload, args[0], self.dtype)
            if layer.kind in ("layer_norm", "group_norm", "rms_norm"):
                return compute_norm(layer, payload, args[0])
            return compute_generic(layer, payload, self.dtype, args, kwargs)
        finally:
            if layer.resident is None:
                self._stream.release(payload)

    # ----------------------------------------------------------------- model-level moves
    def onload(self) -> None:
        """Bring every layer within the budget to the computation device now (instead of at first use)."""
        for layer in self.layers:
            if layer.keep_resident and layer.resident is None:
                layer.resident = self.fetch(layer)
        self._stream.synchronize()

    def offload(self) -> None:
        """Free every copy on the computation device; weights stay in storage and stream back on use."""
        if self.config.storage == "device":
            return
        for layer in self.layers:
            layer.resident = None
        self._stream.clear()

    # ----------------------------------------------------------------- LoRA
    def add_lora(
        self, name: str, weights: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scale: float = 1.0
    ) -> None:
        """Hot-load an adapter: ``weights`` maps layer names to ``(down, up)``; alpha/rank belongs in ``scale``.

        Works with every storage and dtype since the adapter is added to the layer's output, never fused.
        Tensors that require grad are used as they are, so gradients reach them.
        """
        if name in self.lora_names:
            raise ValueError(f"a LoRA named {name!r} is already attached; remove it first or choose another name")
        checked = []
        for layer_name, pair in weights.items():
            layer = self._layers_by_name.get(layer_name)
            if layer is None:
                raise KeyError(f"LoRA {name!r}: no managed Linear or Conv layer named {layer_name!r}")
            down, up = pair
            check_lora_shapes(layer_name, layer.module, layer.kind, down, up)
            checked.append((layer, LoraAdapter(down, up, float(scale))))
        for layer, adapter in checked:
            layer.loras[name] = adapter

    def set_lora_scale(self, name: str, scale: float) -> None:
        for layer in self._lora_layers(name):
            layer.loras[name].scale = float(scale)

    def remove_lora(self, name: str) -> None:
        for layer in self._lora_layers(name):
            del layer.loras[name]

    @property
    def lora_names(self) -> list[str]:
        return sorted({name for layer in self.layers for name in layer.loras})

    def _lora_layers(self, name: str) -> list[ManagedLayer]:
        layers = [layer for layer in self.layers if name in layer.loras]
        if not layers:
            raise KeyError(f"no LoRA named {name!r} is attached; attached: {self.lora_names}")
        return layers

    # ----------------------------------------------------------------- report and undo
    def report(self) -> VRAMReport:
        rows, resident, streamed, on_device = [], 0, 0, 0
        for layer in self.layers:
            placement = "resident" if layer.keep_resident else "streamed"
            is_on_device = layer.resident is not None
            dtype = str(layer.storage_dtype).removeprefix("torch.")
            rows.append(
                LayerReport(
                    layer.name, layer.kind, self.config.storage, dtype, layer.storage_bytes, placement, is_on_device
                )
            )
            resident += layer.storage_bytes if layer.keep_resident else 0
            streamed += 0 if layer.keep_resident else layer.storage_bytes
            on_device += layer.storage_bytes if is_on_device else 0
        for name, module in self.excluded.items():
            nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
            rows.append(LayerReport(name, "excluded", "excluded", "-", nbytes, "excluded", True))
        fixed = self._buffer_bytes + self._excluded_bytes
        peak_cuda = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return VRAMReport(
            device=str(self.device),
            storage=self.config.storage,
            vram_limit_bytes=self.config.vram_limit_bytes,
            layers=rows,
            buffer_bytes=self._buffer_bytes,
            resident_bytes=resident + fixed,
            streamed_bytes=streamed,
            on_device_bytes=on_device + fixed,
            peak_streamed_bytes=self._stream.peak_bytes,
            peak_device_allocated_bytes=peak_cuda,
        )

    def disable(self) -> None:
        """Give the module back as plain parameters: on the device for storage="device", else on the CPU.

        Weights are restored in the computation dtype (FP8 ones dequantized; disk ones read from the source).
        Adapters are dropped, not fused.
        """
        target = self.device if self.config.storage == "device" else torch.device("cpu")
        for hook in self._hooks:
            hook.remove()
        for layer in self.layers:
            del layer.module.__dict__["forward"]
            if layer.had_instance_forward:  # another tool (accelerate hooks, say) had replaced it before us
                layer.module.forward = layer.original_forward
            payload = layer.resident or (layer.stored if layer.stored is not None else self.fetch(layer))
            for entry in layer.entries:
                item = payload[entry.relative_name]
                tensor = item.dequantized(self.dtype) if entry.fp8 or item.data.is_floating_point() else item.data
                tensor = tensor.to(target)
                entry.owner._parameters[entry.attribute] = nn.Parameter(tensor, requires_grad=entry.requires_grad)
            layer.resident = layer.stored = None
            layer.loras.clear()
        self._stream.clear()
        self.layers.clear()
        setattr(self.module, _HANDLE_ATTRIBUTE, None)


class _Streamer:
    """Execution order, prefetching on a CUDA side stream, and the bytes of streamed copies in flight."""

    def __init__(self, handle: VRAMHandle):
        self.handle = handle
        self.prefetch = handle.config.prefetch
        cuda = handle.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(handle.device) if cuda and self.prefetch > 0 else None
        self.order: list[ManagedLayer] | None = None
        self.recording: list[ManagedLayer] | None = None
        self.cursor = -1
        self.in_flight: dict[ManagedLayer, tuple[dict[str, StoredTensor], torch.cuda.Event]] = {}
        self.bytes_in_use = 0
        self.peak_bytes = 0

    def begin_forward(self, module: nn.Module, args: tuple) -> None:
        if self.order is None and self.recording is None:
            self.recording = []
        self.cursor = -1

    def end_forward(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.recording is not None:
            self.order, self.recording = self.recording, None

    def visit(self, layer: ManagedLayer) -> None:
        """Note that ``layer`` runs now, and fetch the next streamed layers of the learned order."""
        if self.recording is not None:
            self.recording.append(layer)
            return
        if not self.order:
            return
        count = len(self.order)
        nxt = (self.cursor + 1) % count
        if self.order[nxt] is not layer:
            later = [i for i in range(count) if self.order[(nxt + i) % count] is layer]
            if not later:
                return  # a layer outside the learned order: compute it without disturbing prefetch
            nxt = (nxt + later[0]) % count
        self.cursor = nxt
        if self.copy_stream is not None:
            self._prefetch_after(nxt)

    def _prefetch_after(self, position: int) -> None:
        fetched, count = 0, len(self.order)
        for step in range(1, count):
            if fetched >= self.prefetch:
                return
            layer = self.order[(position + step) % count]
            if layer.resident is not None:
                continue
            fetched += 1
            if layer in self.in_flight:
                continue
            # No wait on the compute stream: the source is immutable storage, and the caching allocator keeps
            # memory freed on the compute stream (record_stream) from being reused here too early.
            with torch.cuda.stream(self.copy_stream):
                payload = self.handle.fetch(layer)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.in_flight[layer] = (payload, event)
            self.account(layer, payload)

    def take(self, layer: ManagedLayer) -> dict[str, StoredTensor] | None:
        entry = self.in_flight.pop(layer, None)
        if entry is None:
            return None
        payload, event = entry
        current = torch.cuda.current_stream(self.handle.device)
        current.wait_event(event)
        for item in payload.values():
            item.record_stream(current)  # allocated on the copy stream, used and freed on this one
        return payload

    def account(self, layer: ManagedLayer, payload: dict[str, StoredTensor]) -> None:
        self.bytes_in_use += sum(item.nbytes for item in payload.values())
        self.peak_bytes = max(self.peak_bytes, self.bytes_in_use)

    def release(self, payload: dict[str, StoredTensor]) -> None:
        self.bytes_in_use -= sum(item.nbytes for item in payload.values())

    def synchronize(self) -> None:
        if self.handle.device.type == "cuda":
            torch.cuda.current_stream(self.handle.device).synchronize()

    def clear(self) -> None:
        for payload, _ in self.in_flight.values():
            self.release(payload)
        self.in_flight.clear()
