"""CUDA-only behaviour: pinned storage, prefetch on a side stream, the VRAM budget, FP8 matmul.

Run where a GPU is present: `python3 -m pytest -m cuda tests/vram` with packages/*/src on PYTHONPATH.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_vram import SafetensorsSource, VRAMConfig, enable_vram_management

pytestmark = pytest.mark.cuda


def stack(depth: int = 12, width: int = 1024) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).to(torch.bfloat16).eval()


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_streamed_layers_match_a_resident_module(prefetch):
    reference = stack().cuda()
    x = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    expected = reference(x)
    managed = stack()
    layer_bytes = 1024 * 1024 * 2 + 1024 * 2
    handle = enable_vram_management(
        managed,
        VRAMConfig(
            storage="cpu",
            computation_device="cuda",
            computation_dtype=torch.bfloat16,
            vram_limit=3.5 * layer_bytes / 1024**3,
            prefetch=prefetch,
        ),
    )
    assert managed[0].weight.is_pinned()
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(managed(x), expected, rtol=0, atol=0)
    report = handle.report()
    assert sum(layer.placement == "resident" for layer in report.layers) == 3
    assert report.peak_streamed_bytes <= (prefetch + 1) * layer_bytes


def test_device_memory_stays_within_budget_plus_prefetch():
    managed = stack(depth=16, width=2048)
    layer_bytes = 2048 * 2048 * 2 + 2048 * 2
    x = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    enable_vram_management(
        managed,
        VRAMConfig(
            storage="cpu",
            computation_device="cuda",
            computation_dtype=torch.bfloat16,
            vram_limit=4 * layer_bytes / 1024**3,
            prefetch=2,
        ),
    )
    with torch.no_grad():
        managed(x)
        managed(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    assert peak <= (4 + 2 + 2) * layer_bytes + 8 * x.numel() * 2, peak / layer_bytes


def test_disk_storage_streams_to_the_gpu(tmp_path):
    from safetensors.torch import save_file

    reference = stack()
    save_file(reference.state_dict(), str(tmp_path / "stack.safetensors"))
    x = torch.randn(8, 1024, dtype=torch.bfloat16)
    expected = reference.cuda()(x.cuda())
    with torch.device("meta"):
        managed = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(12)])
    enable_vram_management(
        managed,
        VRAMConfig(storage="disk", computation_device="cuda", computation_dtype=torch.bfloat16, vram_limit=0.002),
        weights=SafetensorsSource(tmp_path / "stack.safetensors"),
    )
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(managed(x.cuda()), expected, rtol=0, atol=0)


def test_fp8_matmul_is_close_to_bf16():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmul needs compute capability 8.9+")
    reference = stack(depth=4).cuda()
    x = torch.randn(100, 1024, device="cuda", dtype=torch.bfloat16)  # 100 rows: exercises the padding to 16
    expected = reference(x).float()
    managed = stack(depth=4)
    enable_vram_management(
        managed,
        VRAMConfig(
            storage="device",
            storage_dtype="fp8",
            computation_device="cuda",
            computation_dtype=torch.bfloat16,
            fp8_matmul=True,
        ),
    )
    with torch.no_grad():
        output = managed(x).float()
    error = ((output - expected).norm() / expected.norm()).item()
    assert 0 < error < 0.08, error
