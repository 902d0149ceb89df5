"""Reading hostile or broken weight files: overlapping safetensors tensors, refused pickles, NaN and overflow.

Each malformed file is a real file on disk, read through the same entry points a user reaches.
"""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from ds_loader import CheckpointError, inspect_checkpoint, load_model, open_checkpoints
from ds_loader.checkpoint import load_pickle
from ds_vram import VRAMConfig
from ds_vram.sources import SafetensorsError, SafetensorsSource, all_finite, read_safetensors_header


def _write_raw(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(count: int, first: int = 0) -> dict:
    return {"dtype": "F32", "shape": [count], "data_offsets": [first, first + 4 * count]}


# name -> (header, data bytes, what the error must say)
LAYOUTS = {
    "overlap": (
        {"a.weight": _f32(4, 0), "b.weight": _f32(4, 8)},
        bytes(24),
        r"tensors 'a\.weight' \(bytes 0:16\) and 'b\.weight' \(bytes 8:24\) overlap",
    ),
    "same bytes": (
        {"a.weight": _f32(2, 0), "b.weight": _f32(2, 0)},
        bytes(8),
        r"tensors 'a\.weight' \(bytes 0:8\) and 'b\.weight' \(bytes 0:8\) overlap",
    ),
    "gap": (
        {"a.weight": _f32(2, 0), "b.weight": _f32(2, 12)},
        bytes(20),
        r"4 byte\(s\) after tensor 'a\.weight' belong to no tensor \(tensor 'b\.weight' starts at 12\)",
    ),
    "late start": (
        {"a.weight": _f32(2, 4)},
        bytes(12),
        r"4 byte\(s\) at the start of the data section belong to no tensor \(tensor 'a\.weight'",
    ),
    "trailing bytes": (
        {"a.weight": _f32(2, 0)},
        bytes(8 + 16),
        r"data section holds 24 bytes but the last tensor 'a\.weight' ends at 8; 16 trailing byte",
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_tensors_must_tile_the_data_section(tmp_path, registered, name):
    header, data, message = LAYOUTS[name]
    path = _write_raw(tmp_path / "bad.safetensors", header, data)
    # The safetensors library refuses each of these files; so must every path of ours.
    with pytest.raises(Exception):  # noqa: B017 - the library's own error type is not public
        safetensors.torch.load_file(path)
    for read in (read_safetensors_header, SafetensorsSource, open_checkpoints, inspect_checkpoint, load_model):
        with pytest.raises(SafetensorsError, match=rf"bad\.safetensors: .*{message}"):
            read(path)


def test_tensors_in_any_header_order_and_empty_tensors_are_fine(tmp_path):
    # The header lists b before a; a zero-size tensor takes no bytes between them.
    header = {"b.weight": _f32(2, 8), "empty": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}
    header["a.weight"] = _f32(2, 0)
    data = struct.pack("<4f", 1, 2, 3, 4)
    path = _write_raw(tmp_path / "ok.safetensors", header, data)
    assert safetensors.torch.load_file(path)["b.weight"].tolist() == [3, 4]
    source = SafetensorsSource(path)
    assert source.get("b.weight").tolist() == [3, 4] and source.get("empty").numel() == 0
    # A file the writer made (header padded to 8 bytes) and an empty one are accepted.
    save_file({"x": torch.ones(3)}, tmp_path / "written.safetensors")
    save_file({}, tmp_path / "nothing.safetensors")
    assert list(SafetensorsSource(tmp_path / "written.safetensors").keys()) == ["x"]
    assert list(SafetensorsSource(tmp_path / "nothing.safetensors").keys()) == []


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_a_refused_pickle_names_the_file_why_and_how_to_convert(tmp_path, registered):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "trained.ckpt"
    torch.save({"weight": torch.zeros(2), "evil": _Payload(str(marker))}, path)
    for read in (load_pickle, open_checkpoints, inspect_checkpoint, load_model):
        with pytest.raises(CheckpointError) as caught:
            read(path)
        message = str(caught.value)
        assert message.startswith(f"{path}: refused to load"), message
        assert "`builtins.exec`" in message or "`exec`" in message, message
        assert "not only tensors" in message and "safetensors.torch.save_file" in message
        assert "trained.safetensors" in message
        # torch's own advice (turn weights_only off) and its terminal escapes never reach the user.
        assert "weights_only` set to `False" not in message and "weights_only=False" not in message
        assert "\x1b" not in message
    assert not marker.exists()


def test_a_refused_pickle_with_control_characters_in_its_global_name(tmp_path):
    path = tmp_path / "title.pt"
    # GLOBAL "os<set-title escape>" "system", called on ("true",): a global whose name would retitle the terminal.
    path.write_bytes(b"cos\x1b]0;pwned\x07\nsystem\n(S'true'\ntR.")
    with pytest.raises(CheckpointError, match=r"title\.pt: refused to load") as caught:
        load_pickle(path)
    assert "\x1b" not in str(caught.value) and "\x07" not in str(caught.value)
    assert "\\x1b" in str(caught.value)


def test_all_finite_is_exact_for_every_float_dtype():
    assert all_finite(torch.arange(5)) and all_finite(torch.zeros(0))
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float64):
        clean = torch.randn(64).to(dtype)
        assert all_finite(clean), dtype
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = clean.clone()
            broken[7] = bad
            if dtype == torch.float8_e4m3fn and bad in (float("inf"), float("-inf")):
                continue  # e4m3fn has no infinity: the assignment saturates to its largest value
            assert not all_finite(broken), (dtype, bad)
    # A sum that overflows float16 on finite values is not mistaken for a NaN.
    assert all_finite(torch.full((4,), 60000.0, dtype=torch.float16))


def _broken_state(files, key: str = "blocks.1.mlp.0.weight") -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in files.state.items()}
    state[key][3, 5] = float("nan")
    return state


def test_nan_in_a_checkpoint_is_named_on_every_load_path(files, registered, tmp_path):
    path = tmp_path / "nan-dit.safetensors"
    save_file(_broken_state(files), path)
    # Detection and inspection read headers only; they still work on the file.
    assert inspect_checkpoint(path).entries
    message = r"nan-dit\.safetensors: tensor 'blocks\.1\.mlp\.0\.weight' holds NaN or infinite values"
    with pytest.raises(SafetensorsError, match=message):
        load_model(path)
    with pytest.raises(SafetensorsError, match=message):
        load_model(path, torch_dtype=torch.bfloat16)
    with pytest.raises(SafetensorsError, match=message):
        load_model(path, vram=VRAMConfig(storage="cpu", computation_device="cpu"))
    pickled = tmp_path / "nan-dit.pth"
    torch.save(_broken_state(files), pickled)
    with pytest.raises(CheckpointError, match=r"nan-dit\.pth: tensor 'blocks\.1\.mlp\.0\.weight' holds NaN"):
        load_model(pickled)


def test_nan_in_a_converted_checkpoint_names_the_key_in_the_file(files, registered, tmp_path):
    state = {k: v.clone() for k, v in files.diffusers_state.items()}
    state["transformer_blocks.0.attn.to_qkv.weight"][40, 1] = float("inf")
    path = tmp_path / "inf-diffusers.safetensors"
    save_file(state, path)
    with pytest.raises(SafetensorsError, match=r"inf-diffusers\.safetensors: tensor 'transformer_blocks\.0\.attn"):
        load_model(path)


def test_disk_streaming_checks_a_tensor_when_it_is_first_read(files, tiny, registered, tmp_path):
    path = tmp_path / "nan-streamed.safetensors"
    save_file(_broken_state(files), path)
    model = load_model(path, vram=VRAMConfig(storage="disk", computation_device="cpu"))  # stays lazy: no error yet
    assert any(p.is_meta for p in model.parameters())
    inputs = torch.randn(1, files.config.tokens, files.config.in_channels)
    with pytest.raises(SafetensorsError, match=r"nan-streamed\.safetensors: tensor 'blocks\.1\.mlp\.0\.weight'"):
        model(inputs)
    # A clean file streams as before, and each tensor is checked once, not at every use.
    clean = load_model(files.original, vram=VRAMConfig(storage="disk", computation_device="cpu"))
    clean(inputs)
    clean(inputs)


def test_casting_to_a_narrower_dtype_that_overflows_is_named(files, registered, tmp_path):
    state = {k: v.clone() for k, v in files.state.items()}
    state["img_in.weight"][0, 0] = 1e6  # finite in float32, infinite in float16
    path = tmp_path / "large.safetensors"
    save_file(state, path)
    load_model(path)  # as stored: fine
    load_model(path, torch_dtype=torch.bfloat16)  # bfloat16 has float32's range
    with pytest.raises(CheckpointError, match=r"large\.safetensors: tensor 'img_in\.weight' does not fit .*float16"):
        load_model(path, torch_dtype=torch.float16)
