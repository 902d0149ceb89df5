"""Opening checkpoints: every file layout, headers only, and every kind of bad or hostile input."""

from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from ds_loader import CheckpointError, detect, inspect_checkpoint, load_model, open_checkpoints
from ds_vram.sources import SafetensorsError, SafetensorsSource


def test_single_file_shards_and_index(files):
    (single,) = open_checkpoints(files.original)
    (sharded,) = open_checkpoints(files.shard_index)
    (folder,) = open_checkpoints(files.sharded)
    (listed,) = open_checkpoints(sorted(files.sharded.glob("*.safetensors")))
    for checkpoint in (single, sharded, folder, listed):
        assert set(checkpoint.keys()) == set(files.state)
        assert checkpoint.info("blocks.1.mlp.0.weight").shape == (64, 32)
        torch.testing.assert_close(checkpoint.get("blocks.1.mlp.0.weight"), files.state["blocks.1.mlp.0.weight"])
    assert len(sharded.paths) == 3 and sharded.component is None


def test_diffusers_repository_opens_one_checkpoint_per_component(files):
    checkpoints = open_checkpoints(files.repo)
    assert [c.component for c in checkpoints] == ["transformer", "vae"]
    transformer = checkpoints[0]
    # The shards (via their index) are chosen; the fp16 variant beside them is ignored.
    assert all(".fp16." not in p.name for p in transformer.paths) and len(transformer.paths) == 2
    assert transformer.config_json == {"num_layers": 2}
    assert transformer.info("transformer_blocks.0.attn.to_qkv.weight").dtype == torch.float32


def test_pickle_formats_load_weights_only(files):
    for path in (files.pth, files.ckpt, files.legacy_bin):
        (checkpoint,) = open_checkpoints(path)
        assert set(checkpoint.keys()) == set(files.state), path
        torch.testing.assert_close(checkpoint.get("pos_embed"), files.state["pos_embed"])


class _Payload:
    """Unpickling this runs ``open(marker, "w").write(...)``: what a malicious checkpoint would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("suffix", [".pth", ".bin", ".pt", ".ckpt"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_with_code_payload_is_refused_and_never_runs(tmp_path, suffix, writer, registered):
    marker = tmp_path / "payload-ran.txt"
    path = tmp_path / f"evil{suffix}"
    payload = {"weight": torch.zeros(2), "evil": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)
    # The payload is real: plain pickle would run it.
    if writer == "pickle.dump":
        with open(path, "rb") as handle:
            pickle.load(handle)
        assert marker.exists()
        marker.unlink()
    for entry in (open_checkpoints, load_model, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=rf"{path.name}: refused to load.*weights_only=True"):
            entry(path)
    assert not marker.exists()


def test_pickle_without_tensors_or_of_the_wrong_shape(tmp_path):
    path = tmp_path / "hyper.pt"
    torch.save({"lr": 0.1, "steps": 3}, path)
    with pytest.raises(CheckpointError, match=r"hyper\.pt: holds no tensors"):
        open_checkpoints(path)
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(CheckpointError, match=r"list\.pt: holds a list, not a dict of tensors"):
        open_checkpoints(listed)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.bin: the file is empty"):
        open_checkpoints(empty)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a pickle at all" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pth"):
        open_checkpoints(garbage)


def _header(entries: dict) -> bytes:
    raw = json.dumps(entries).encode()
    return struct.pack("<Q", len(raw)) + raw


def _bad_files(tmp_path, good) -> dict[str, tuple[bytes, str]]:
    data = good.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    one = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    outside = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}
    return {
        "empty": (b"", r"not a safetensors file"),
        "short": (b"\x01\x02\x03", r"not a safetensors file"),
        "truncated": (data[: 8 + length + 100], r"(outside|truncated)"),
        "header_beyond_file": (struct.pack("<Q", 10_000) + b"{}", r"header length 10000"),
        "huge_header_length": (struct.pack("<Q", 2**62) + b"{}", r"header length"),
        "invalid_json": (struct.pack("<Q", 5) + b"{not}", r"JSON"),
        "offsets_outside": (_header(outside) + bytes(16), r"data_offsets"),
        "not_object": (struct.pack("<Q", 2) + b"[]", r"JSON object"),
        "ok_control": (_header(one) + bytes(16), ""),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "short",
        "truncated",
        "header_beyond_file",
        "huge_header_length",
        "invalid_json",
        "offsets_outside",
        "not_object",
    ],
)
def test_bad_safetensors_raise_errors_naming_the_file(files, tmp_path, registered, case):
    data, message = _bad_files(tmp_path, files.original)[case]
    path = tmp_path / f"bad-{case}.safetensors"
    path.write_bytes(data)
    for entry in (open_checkpoints, detect, load_model, inspect_checkpoint):
        with pytest.raises(SafetensorsError, match=rf"{path}: .*{message}"):
            entry(path)


def test_a_control_file_built_the_same_way_opens(files, tmp_path):
    data, _ = _bad_files(tmp_path, files.original)["ok_control"]
    path = tmp_path / "fine.safetensors"
    path.write_bytes(data)
    (checkpoint,) = open_checkpoints(path)
    assert checkpoint.info("w").shape == (2, 2)


def test_bad_shard_index_and_folders(tmp_path, files):
    missing = tmp_path / "missing.safetensors.index.json"
    missing.write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(
        CheckpointError, match=r"missing\.safetensors\.index\.json: shard model-00001\.safetensors is missing"
    ):
        open_checkpoints(missing)
    escaping = tmp_path / "escape.safetensors.index.json"
    escaping.write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match=r"shard name '\.\./\.\./etc/passwd' must be a file next to the index"):
        open_checkpoints(escaping)
    broken = tmp_path / "broken.safetensors.index.json"
    broken.write_text("{")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors\.index\.json: not valid JSON"):
        open_checkpoints(broken)
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(CheckpointError, match=r"nothing: no weights found"):
        open_checkpoints(empty_dir)
    text = tmp_path / "notes.txt"
    text.write_text("hi")
    with pytest.raises(CheckpointError, match=r"notes\.txt: unsupported checkpoint format"):
        open_checkpoints(text)
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*absent\.safetensors"):
        open_checkpoints(tmp_path / "absent.safetensors")


def test_a_glob_of_a_component_folder_keeps_only_weight_files(files):
    everything = sorted((files.repo / "transformer").glob("*"))
    assert any(p.name == "config.json" for p in everything)
    (checkpoint,) = open_checkpoints([p for p in everything if ".fp16." not in p.name])
    assert len(checkpoint.paths) == 2 and set(checkpoint.keys()) == set(files.diffusers_state)
    index = files.repo / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    (by_index,) = open_checkpoints([files.repo / "transformer" / "config.json", index])
    assert by_index.paths == checkpoint.paths
    with pytest.raises(CheckpointError, match=r"none of .*config\.json.* is a weight file"):
        open_checkpoints([files.repo / "transformer" / "config.json", files.repo / "model_index.json"])


def test_duplicate_key_across_files_is_an_error(tmp_path, files):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pth"
    save_file({"x": torch.zeros(1)}, a)
    torch.save({"x": torch.zeros(1)}, b)
    with pytest.raises(CheckpointError, match=r"'x' appears in both .*a\.safetensors and .*b\.pth"):
        open_checkpoints([a, b])


def test_detection_reads_no_tensor_data(files, registered):
    """Detection and inspection look at headers only: no file is ever memory-mapped for its tensors."""
    checkpoints = open_checkpoints(files.repo) + open_checkpoints(files.shard_index)
    matches = detect(checkpoints)
    assert {m.spec.name for m in matches} == {"tiny.dit", "tiny.vae"}
    for checkpoint in checkpoints:
        assert isinstance(checkpoint.source, SafetensorsSource)
        assert checkpoint.source._maps == [None] * len(checkpoint.paths)
    checkpoints[0].get("proj_out.weight")  # reading a tensor is what maps a file
    assert checkpoints[0].source._maps.count(None) == 1


def test_unreadable_file_names_the_file(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "locked.safetensors"
    path.write_bytes(b"x" * 16)
    path.chmod(0)
    with pytest.raises(SafetensorsError, match=r"locked\.safetensors: cannot read"):
        open_checkpoints(path)
