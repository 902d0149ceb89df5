"""Disk storage keeps a forward's extra anonymous memory near one layer, not one model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from safetensors.torch import save_file
    from ds_vram import SafetensorsSource, VRAMConfig, enable_vram_management

    path, dtype_name, limit, width, depth = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), 1024, 16

    def model():
        return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in model().state_dict().items()}, path)
    torch.set_num_threads(1)

    def anonymous_bytes():
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    with torch.device("meta"):
        managed = model()
    dtype = getattr(torch, dtype_name)
    enable_vram_management(managed, VRAMConfig(storage="disk", computation_device="cpu", computation_dtype=dtype,
                                               vram_limit=limit), weights=SafetensorsSource(path))
    x = torch.randn(64, width, dtype=dtype)
    with torch.no_grad():
        before = anonymous_bytes()
        samples = [before]
        for layer in managed:  # sampled while each layer's fetched weights are still alive
            layer.register_forward_hook(lambda module, args, output: samples.append(anonymous_bytes()))
        managed(x)
    extra = max(samples) - before
    print(json.dumps({"extra": extra, "layer": width * width * 4, "model": depth * width * width * 4}))
    """
)


def measure(tmp_path, dtype: str, vram_limit: float | None) -> dict:
    command = [sys.executable, "-c", SCRIPT, str(tmp_path / "model.safetensors"), dtype, json.dumps(vram_limit)]
    # glibc raises its mmap threshold after large frees and then keeps freed layer buffers in the heap, so RssAnon
    # drifted up to ~2.4 layers over 16 layers of which each was freed (a flaky bound). A fixed threshold returns
    # them to the system: what is measured is what the forward still holds, which is what this test is about.
    environment = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_disk_forward_extra_anonymous_memory_is_about_one_layer(tmp_path, dtype):
    measured = measure(tmp_path, dtype, vram_limit=0.0)
    # float32 computes on zero-copy views of the file (page cache, not anonymous memory); bfloat16 casts one
    # layer at a time (half a float32 layer). The model is 16 layers of 4 MiB.
    assert measured["extra"] <= 2 * measured["layer"], measured


def test_the_measurement_sees_weights_kept_in_memory(tmp_path):
    """Control: with no budget the bfloat16 casts stay resident, and the same measurement shows 8 layers' worth."""
    measured = measure(tmp_path, "bfloat16", vram_limit=None)
    assert measured["extra"] >= 7 * measured["layer"], measured
