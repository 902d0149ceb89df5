"""ds-vram: layer-level VRAM management for any ``torch.nn.Module``.

Weights are stored where memory is cheap (the device, pinned CPU RAM, or a safetensors file read lazily),
in a dtype of the user's choosing (down to FP8 with per-channel scales), and computed where it is fast.
"""

from .config import VRAMConfig
from .estimate import WeightEstimate, estimate_weights
from .fp8 import quantize_fp8
from .lora import LoraAdapter
from .manager import VRAMHandle, enable_vram_management, get_vram_handle
from .report import LayerReport, VRAMReport
from .sources import SafetensorsError, SafetensorsSource, TensorInfo, WeightSource, read_safetensors_header

__all__ = [
    "LayerReport",
    "LoraAdapter",
    "SafetensorsError",
    "SafetensorsSource",
    "TensorInfo",
    "VRAMConfig",
    "VRAMHandle",
    "VRAMReport",
    "WeightEstimate",
    "WeightSource",
    "enable_vram_management",
    "estimate_weights",
    "get_vram_handle",
    "quantize_fp8",
    "read_safetensors_header",
]
