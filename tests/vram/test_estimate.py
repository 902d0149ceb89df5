"""estimate_weights sizes a module as enable_vram_management stores it, also when the module is on meta."""

from __future__ import annotations

import pytest
import torch

from ds_vram import VRAMConfig, enable_vram_management, estimate_weights
from tests.vram.tiny_models import TinyNet


@pytest.mark.parametrize(
    "storage_dtype, never_fp8, units",
    [(None, (), ()), ("fp8", (), ()), ("fp8", ("head", "blocks.0.*"), ()), ("fp8", (), ("blocks.1",))],
)
def test_estimate_equals_what_ds_vram_stores(storage_dtype, never_fp8, units):
    torch.manual_seed(0)
    model = TinyNet()
    with torch.device("meta"):
        on_meta = TinyNet()
    estimate = estimate_weights(on_meta, storage_dtype, torch.bfloat16, never_fp8=never_fp8, units=units)
    config = VRAMConfig(
        storage="device",
        storage_dtype=storage_dtype,
        computation_device="cpu",
        computation_dtype=torch.bfloat16,
        never_fp8=never_fp8,
        units=units,
    )
    report = enable_vram_management(model, config).report()
    assert estimate.total_bytes == report.resident_bytes
    assert estimate.largest_layer_bytes == max(layer.nbytes for layer in report.layers)
    assert estimate.layer_count == len(report.layers)
    assert estimate.parameter_count == sum(p.numel() for p in TinyNet().parameters())


def test_fp8_estimate_is_about_half_and_errors_name_the_argument():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    bf16 = estimate_weights(model)
    fp8 = estimate_weights(model, "fp8")
    assert bf16.total_bytes == 2 * (1024 * 1024 + 1024) * 2
    assert fp8.total_bytes == 2 * (1024 * 1024 + 4 * 1024 + 1024 * 2)
    with pytest.raises(ValueError, match="storage_dtype='int4'"):
        estimate_weights(model, "int4")
