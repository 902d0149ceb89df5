"""Bad input ends in a clear error naming what is at fault; the safetensors reader is strict and zero-copy."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ds_vram import SafetensorsError, SafetensorsSource, VRAMConfig, enable_vram_management
from tests.vram.tiny_models import TinyNet, clone_of, tiny_inputs


def test_disk_storage_needs_a_source(tiny_net):
    with pytest.raises(ValueError, match="storage='disk' needs a weight source"):
        enable_vram_management(tiny_net, VRAMConfig(storage="disk", computation_device="cpu"))


def test_source_missing_a_key_names_layer_and_key(tiny_net, tmp_path):
    state = {k: v for k, v in tiny_net.state_dict().items() if k != "blocks.1.up.weight"}
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(KeyError, match=r"1 missing keys: blocks\.1\.up\.weight \(layer 'blocks\.1\.up'\)"):
        enable_vram_management(
            clone_of(tiny_net),
            VRAMConfig(storage="disk", computation_device="cpu"),
            weights=SafetensorsSource(tmp_path / "partial.safetensors"),
        )


def test_source_with_a_wrong_shape_names_layer_and_key(tiny_net, tmp_path):
    state = dict(tiny_net.state_dict())
    state["head.weight"] = torch.zeros(16, 31)
    save_file(state, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(KeyError, match=r"head\.weight: source \(16, 31\), layer 'head' expects \(16, 32\)"):
        enable_vram_management(
            clone_of(tiny_net),
            VRAMConfig(storage="disk", computation_device="cpu"),
            weights=SafetensorsSource(tmp_path / "wrong.safetensors"),
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(storage_dtype="int4"), ValueError, r"storage_dtype='int4' is not supported; use one of: bfloat16"),
        (dict(computation_dtype="fp8"), ValueError, r"computation_dtype='fp8' is not supported"),
        (dict(computation_device="tpu"), ValueError, r"computation_device='tpu' is not a device"),
        (dict(storage="ssd"), ValueError, r"storage='ssd' is not supported"),
        (dict(storage="device", vram_limit=4.0), ValueError, r"vram_limit needs storage='cpu' or 'disk'"),
        (dict(vram_limit=-1), ValueError, r"vram_limit=-1 must be a number of GiB >= 0"),
        (dict(prefetch=-2), ValueError, r"prefetch=-2 must be an integer >= 0"),
        (dict(fp8_scaling="row"), ValueError, r"fp8_scaling='row' is not supported"),
        (dict(units="blocks.*"), TypeError, r"units must be a tuple of glob patterns"),
    ],
)
def test_configuration_errors(tiny_net, kwargs, error, message):
    kwargs.setdefault("computation_device", "cpu")
    with pytest.raises(error, match=message):
        enable_vram_management(tiny_net, VRAMConfig(**kwargs))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(tiny_net):
    with pytest.raises(RuntimeError, match="asks for CUDA, but this machine has no CUDA GPU"):
        enable_vram_management(tiny_net, VRAMConfig(computation_device="cuda"))
    with pytest.raises(RuntimeError, match="fp8_matmul=True needs a CUDA GPU"):
        enable_vram_management(tiny_net, VRAMConfig(computation_device="cpu", storage_dtype="fp8", fp8_matmul=True))


def test_other_misuse(tiny_net):
    with pytest.raises(TypeError, match=r"needs a torch.nn.Module"):
        enable_vram_management(object(), VRAMConfig(computation_device="cpu"))
    with pytest.raises(TypeError, match=r"weights must implement ds_vram.WeightSource"):
        enable_vram_management(tiny_net, VRAMConfig(computation_device="cpu"), weights={"a": torch.zeros(1)})
    enable_vram_management(tiny_net, VRAMConfig(computation_device="cpu"))
    with pytest.raises(RuntimeError, match="already managed by ds-vram"):
        enable_vram_management(tiny_net, VRAMConfig(computation_device="cpu"))
    with torch.device("meta"):
        on_meta = TinyNet()
    with pytest.raises(ValueError, match=r"parameter 'embed.weight' is on the meta device; use storage='disk'"):
        enable_vram_management(on_meta, VRAMConfig(storage="cpu", computation_device="cpu"))


# ---------------------------------------------------------------------------------------- the reader
def write_raw(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_reader_matches_safetensors_and_is_zero_copy(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(6).view(2, 3),
        "d": torch.randn(4, 4).to(torch.float8_e4m3fn),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    source = SafetensorsSource(tmp_path / "x.safetensors")
    expected = load_file(str(tmp_path / "x.safetensors"))
    assert sorted(source.keys()) == sorted(expected)
    for key, value in expected.items():
        got = source.get(key)
        assert got.dtype == value.dtype and got.shape == value.shape
        assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), key
        assert source.info(key).shape == tuple(value.shape)
    assert source.metadata == {"format": "pt"}
    first, second = source.get("a"), source.get("a")
    assert first.data_ptr() == second.data_ptr()  # both views of the same mapped pages
    first.add_(1)  # copy-on-write: the file is untouched
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["a"], expected["a"])


def test_reader_rejects_broken_files(tmp_path):
    cases = {
        "empty.safetensors": lambda p: p.write_bytes(b"") and p,
        "short.safetensors": lambda p: p.write_bytes(b"\x01\x02") and p,
        "beyond.safetensors": lambda p: write_raw(p, {"a": {}}, length=10_000),
        "json.safetensors": lambda p: write_raw(p, b"{not json"),
        "outside.safetensors": lambda p: write_raw(
            p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, data=b"\0" * 8
        ),
        "mismatch.safetensors": lambda p: write_raw(
            p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, data=b"\0" * 16
        ),
        "dtype.safetensors": lambda p: write_raw(
            p, {"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, data=b"\0"
        ),
    }
    messages = {
        "empty.safetensors": "not a safetensors file",
        "short.safetensors": "not a safetensors file",
        "beyond.safetensors": "header length 10000 runs beyond the file",
        "json.safetensors": "the header is not valid JSON",
        "outside.safetensors": r"data_offsets \[0, 16\] outside the data section \(8 bytes\)",
        "mismatch.safetensors": "spans 16 bytes but dtype F32 and shape",
        "dtype.safetensors": "unsupported dtype 'Q4'",
    }
    for name, make in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(SafetensorsError, match=messages[name]) as caught:
            SafetensorsSource(path)
        assert str(path) in str(caught.value)
    with pytest.raises(FileNotFoundError, match="safetensors file not found"):
        SafetensorsSource(tmp_path / "absent.safetensors")


def test_reader_shards_and_duplicates(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "1.safetensors"))
    save_file({"b": torch.zeros(2)}, str(tmp_path / "2.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "3.safetensors"))
    source = SafetensorsSource([tmp_path / "1.safetensors", tmp_path / "2.safetensors"])
    assert sorted(source.keys()) == ["a", "b"] and source.path_of("b").name == "2.safetensors"
    with pytest.raises(KeyError, match="tensor 'c' is not in"):
        source.get("c")
    with pytest.raises(SafetensorsError, match="tensor 'a' appears in both"):
        SafetensorsSource([tmp_path / "1.safetensors", tmp_path / "3.safetensors"])


def test_execution_order_is_learned_on_the_first_forward(tiny_net):
    managed = clone_of(tiny_net)
    handle = enable_vram_management(
        managed, VRAMConfig(storage="cpu", computation_device="cpu", computation_dtype=torch.float32, vram_limit=0)
    )
    managed(*tiny_inputs())
    order = [layer.name for layer in handle._stream.order]
    assert order[:4] == ["embed", "stem.conv", "stem.norm", "stem.conv1d"]
    assert order[-3:] == ["gain", "final_norm", "head"]
    assert order.index("blocks.0.norm") < order.index("blocks.0.up") < order.index("blocks.0.down")
