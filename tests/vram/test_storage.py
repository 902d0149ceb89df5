"""Every storage place and dtype computes what the unmanaged module computes."""

from __future__ import annotations

import pytest
import torch

from ds_vram import SafetensorsSource, VRAMConfig, enable_vram_management
from tests.vram.tiny_models import TinyNet, clone_of, tiny_inputs

STORAGES = ["device", "cpu", "disk"]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


PLACES = [("device", None)] + [(storage, limit) for storage in ("cpu", "disk") for limit in (None, 0.0, 0.00001)]


@pytest.mark.parametrize(("storage", "vram_limit"), PLACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matching_dtypes_are_bitwise_equal(tiny_net, tiny_file, storage, dtype, vram_limit):
    reference = clone_of(tiny_net).to(dtype)
    reference.offset = tiny_net.offset  # ds-vram moves buffers but keeps their dtype (rope tables need float32)
    inputs = tiny_inputs(dtype=dtype)
    expected = reference(*inputs)
    managed = clone_of(tiny_net)
    if storage == "disk":
        managed = managed.to(dtype)
        source = SafetensorsSource(tiny_file)
    else:
        source = None
    config = VRAMConfig(storage=storage, computation_device="cpu", computation_dtype=dtype, vram_limit=vram_limit)
    # With disk storage the file holds float32: each layer is cast at compute time, as `.to(dtype)` did up front.
    handle = enable_vram_management(managed, config, weights=source)
    for _ in range(2):  # the second call runs on the learned order and any resident copies
        assert torch.equal(managed(*inputs), expected)
    report = handle.report()
    if vram_limit == 0.0:
        assert all(layer.placement == "streamed" for layer in report.layers)
    if vram_limit is None:
        assert report.streamed_bytes == 0


def test_disk_storage_builds_from_meta(tiny_net, tiny_file):
    with torch.device("meta"):
        managed = TinyNet()
    enable_vram_management(
        managed,
        VRAMConfig(storage="disk", computation_device="cpu", computation_dtype=torch.float32, vram_limit=0),
        weights=SafetensorsSource(tiny_file),
    )
    assert torch.equal(managed(*tiny_inputs()), tiny_net(*tiny_inputs()))


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize(("fp8", "bound"), [("float8_e4m3fn", 0.04), ("float8_e5m2", 0.08)])
def test_fp8_storage_within_bound(tiny_net, tiny_file, storage, fp8, bound):
    expected = tiny_net(*tiny_inputs())
    managed = clone_of(tiny_net)
    config = VRAMConfig(
        storage=storage,
        storage_dtype=fp8,
        computation_device="cpu",
        computation_dtype=torch.float32,
        vram_limit=None if storage == "device" else 1.0,
    )
    handle = enable_vram_management(managed, config, weights=SafetensorsSource(tiny_file))
    output = managed(*tiny_inputs())
    error = relative_error(output, expected)
    assert 0 < error < bound, error  # FP8 changes the result, but only a little
    kinds = {layer.name: (layer.kind, layer.dtype) for layer in handle.report().layers}
    assert kinds["blocks.0.up"] == ("linear", fp8)
    assert kinds["stem.conv"] == ("conv", fp8)
    assert kinds["embed"] == ("embedding", fp8)
    assert kinds["blocks.0.norm"] == ("layer_norm", "float32")  # small and sensitive: never FP8


def test_fp8_storage_uses_less_memory(tiny_net):
    plain = enable_vram_management(
        clone_of(tiny_net), VRAMConfig(storage="cpu", computation_device="cpu", computation_dtype=torch.float32)
    )
    fp8 = enable_vram_management(
        clone_of(tiny_net),
        VRAMConfig(storage="cpu", storage_dtype="fp8", computation_device="cpu", computation_dtype=torch.float32),
    )
    plain_bytes = {layer.name: layer.nbytes for layer in plain.report().layers}
    fp8_bytes = {layer.name: layer.nbytes for layer in fp8.report().layers}
    # weight at 1 byte + float32 per-channel scale + float32 bias, against 4 bytes per element
    assert fp8_bytes["blocks.0.up"] == 64 * 32 + 64 * 4 + 64 * 4
    assert plain_bytes["blocks.0.up"] == (64 * 32 + 64) * 4


def test_never_fp8_patterns(tiny_net):
    class Declared(TinyNet):
        ds_vram_never_fp8 = ("head",)

    model = Declared()
    model.load_state_dict(tiny_net.state_dict())
    config = VRAMConfig(
        storage="cpu",
        storage_dtype="fp8",
        computation_device="cpu",
        computation_dtype=torch.float32,
        never_fp8=("blocks.1.*",),
    )
    handle = enable_vram_management(model, config)
    dtypes = {layer.name: layer.dtype for layer in handle.report().layers}
    assert dtypes["head"] == "float32"
    assert dtypes["blocks.1.up"] == dtypes["blocks.1.down"] == "float32"
    assert dtypes["blocks.0.up"] == "float8_e4m3fn"


def test_per_channel_fp8_beats_plain_cast_on_outlier_channels():
    from ds_vram import quantize_fp8
    from ds_vram.fp8 import dequantize

    weight = torch.randn(64, 128) * 0.02
    weight[3] *= 40_000  # an outlier channel beyond e4m3's range of 448
    weight[7] *= 0.01  # a quiet channel deep in its subnormal range
    errors = {}
    for scaling in ("channel", "tensor", "none"):
        data, scale = quantize_fp8(weight, torch.float8_e4m3fn, scaling)
        assert data.dtype == torch.float8_e4m3fn
        errors[scaling] = relative_error(dequantize(data, scale, torch.float32), weight)
        quiet = dequantize(data, scale, torch.float32)[7]
        errors[scaling + "_quiet"] = relative_error(quiet, weight[7])
    assert errors["channel"] < 0.05
    assert errors["channel"] < errors["none"] / 10
    assert errors["channel_quiet"] < 0.05 < errors["tensor_quiet"]


def test_module_keeps_exact_weights_as_parameters(tiny_net):
    """Where nothing is converted, the module's parameters are the stored tensors: state_dict stays usable."""
    managed = clone_of(tiny_net)
    enable_vram_management(
        managed, VRAMConfig(storage="cpu", computation_device="cpu", computation_dtype=torch.float32)
    )
    state = managed.state_dict()
    for key, value in tiny_net.state_dict().items():
        assert torch.equal(state[key], value), key


def test_fp8_placeholders_report_the_computation_dtype(tiny_net):
    """Models (T5, say) read `layer.weight.dtype` to cast activations: it must not say FP8."""
    managed = clone_of(tiny_net)
    enable_vram_management(
        managed,
        VRAMConfig(storage="cpu", storage_dtype="fp8", computation_device="cpu", computation_dtype=torch.bfloat16),
    )
    assert managed.blocks[0]["up"].weight.dtype == torch.bfloat16
    assert managed.blocks[0]["up"].weight.shape == (64, 32)


def test_units_are_fetched_and_computed_together(tiny_net):
    managed = clone_of(tiny_net)
    handle = enable_vram_management(
        managed,
        VRAMConfig(
            storage="cpu", computation_device="cpu", computation_dtype=torch.float32, vram_limit=0, units=("blocks.*",)
        ),
    )
    names = [layer.name for layer in handle.report().layers]
    assert "blocks.0" in names and "blocks.0.up" not in names
    assert torch.equal(managed(*tiny_inputs()), tiny_net(*tiny_inputs()))


def test_excluded_layers_stay_plain_and_trainable(tiny_net):
    managed = clone_of(tiny_net)
    handle = enable_vram_management(
        managed,
        VRAMConfig(
            storage="cpu",
            storage_dtype="fp8",
            computation_device="cpu",
            computation_dtype=torch.float32,
            exclude=("head",),
        ),
    )
    assert managed.head.weight.requires_grad and managed.head.weight.dtype == torch.float32
    assert "head" not in [layer.name for layer in handle.layers]
    managed(*tiny_inputs()).sum().backward()
    assert managed.head.weight.grad is not None


def test_onload_offload_and_disable(tiny_net, tiny_file):
    managed = clone_of(tiny_net)
    handle = enable_vram_management(
        managed,
        VRAMConfig(storage="disk", computation_device="cpu", computation_dtype=torch.float32, vram_limit=None),
        weights=SafetensorsSource(tiny_file),
    )
    buffers = handle.report().buffer_bytes
    assert handle.report().on_device_bytes == buffers  # nothing fetched before first use
    handle.onload()
    report = handle.report()
    assert report.on_device_bytes == report.resident_bytes > buffers
    handle.offload()
    assert handle.report().on_device_bytes == buffers
    expected = tiny_net(*tiny_inputs())
    assert torch.equal(managed(*tiny_inputs()), expected)  # after offload, layers come back on use
    from ds_vram import get_vram_handle

    assert get_vram_handle(managed) is handle
    handle.disable()
    assert get_vram_handle(managed) is None
    assert "forward" not in managed.blocks[0]["up"].__dict__
    assert not any(p.is_meta for p in managed.parameters())
    assert torch.equal(managed(*tiny_inputs()), expected)
    enable_vram_management(managed, VRAMConfig(computation_device="cpu", computation_dtype=torch.float32))


def test_report_counts_the_budget(tiny_net):
    managed = clone_of(tiny_net)
    limit_bytes = 20_000
    handle = enable_vram_management(
        managed,
        VRAMConfig(
            storage="cpu", computation_device="cpu", computation_dtype=torch.float32, vram_limit=limit_bytes / 1024**3
        ),
    )
    managed(*tiny_inputs())
    report = handle.report()
    assert report.resident_bytes <= limit_bytes
    assert report.streamed_bytes > 0
    assert report.resident_bytes + report.streamed_bytes == report.buffer_bytes + sum(
        p.numel() * 4 for p in tiny_net.parameters()
    )
    largest_streamed = max(layer.nbytes for layer in report.layers if layer.placement == "streamed")
    assert 0 < report.peak_streamed_bytes <= 2 * largest_streamed
    text = str(report)
    assert "blocks.0.up" in text and "streamed" in text and "resident" in text
