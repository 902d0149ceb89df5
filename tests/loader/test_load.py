"""load_model end to end on tiny real files: every format, dtypes, zero copy, strict validation, ds-vram."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from ds_loader import (
    AmbiguousModelError,
    DetectionError,
    ModelConfig,
    StateDictMismatchError,
    load_model,
)


def _reference(tiny, files):
    model = tiny.TinyDiT(files.config)
    model.load_state_dict(files.state)
    return model.eval()


def _inputs(files):
    return torch.randn(2, files.config.tokens, files.config.in_channels, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "layout", ["original", "comfy", "diffusers_file", "shard_index", "sharded", "pth", "ckpt", "legacy_bin"]
)
def test_every_layout_loads_the_same_model(tiny, files, registered, layout):
    model = load_model(getattr(files, layout))
    assert isinstance(model, tiny.TinyDiT) and not model.training
    assert model.config == files.config
    for key, value in files.state.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0, msg=key)
    x = _inputs(files)
    torch.testing.assert_close(model(x), _reference(tiny, files)(x))


def test_diffusers_repository_component_and_spec_choice(tiny, files, registered):
    with pytest.raises(AmbiguousModelError, match=r"tiny\.dit .*transformer.*tiny\.vae .*vae.*pass spec="):
        load_model(files.repo)
    dit = load_model(files.repo, spec="tiny.dit")
    vae = load_model(files.repo, spec=tiny.vae_spec)
    assert isinstance(dit, tiny.TinyDiT) and isinstance(vae, tiny.TinyVAE)
    torch.testing.assert_close(dit.blocks[1].attn.k.weight, files.state["blocks.1.attn.k.weight"])
    torch.testing.assert_close(vae.decoder[0].bias, files.vae_state["decoder.0.bias"])
    # The component folder alone needs no spec; the fp16 variant next to the shards is not mixed in.
    assert load_model(files.repo / "transformer").blocks[0].norm.weight.dtype == torch.float32


def test_model_config_with_local_path(tiny, files, registered):
    model = load_model(ModelConfig(path=str(files.original)))
    assert isinstance(model, tiny.TinyDiT)


def test_spec_given_explicitly_needs_no_registry(tiny, files):
    model = load_model(files.diffusers_file, spec=tiny.dit_spec)
    torch.testing.assert_close(model.final.adaLN.weight, files.state["final.adaLN.weight"])
    with pytest.raises(DetectionError, match=r"spec 'tiny.vae' does not recognise .*tiny-dit.safetensors.*encoder"):
        load_model(files.original, spec=tiny.vae_spec)


def test_eager_dtype_conversion_keeps_integer_buffers(tiny, files, registered):
    model = load_model(files.original, torch_dtype=torch.bfloat16)
    assert model.img_in.weight.dtype == torch.bfloat16
    assert model.position_ids.dtype == torch.int64
    torch.testing.assert_close(model.img_in.weight, files.state["img_in.weight"].to(torch.bfloat16), rtol=0, atol=0)
    up = load_model(files.original_bf16, torch_dtype=torch.float32)
    assert up.blocks[0].mlp[0].weight.dtype == torch.float32
    as_stored = load_model(files.original_bf16)
    assert as_stored.blocks[0].mlp[0].weight.dtype == torch.bfloat16
    assert all(p.requires_grad for p in as_stored.parameters())


def _mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds the tensor's data, from /proc/self/maps (None: anonymous memory)."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_same_dtype_binds_views_of_the_mapped_file(files, registered):
    """No copy when dtypes match: parameters live in the file mapping (page cache), not anonymous memory."""
    model = load_model(files.original_bf16)
    assert _mapped_file(model.blocks[0].attn.q.weight) == str(files.original_bf16)
    assert _mapped_file(model.final.linear.bias) == str(files.original_bf16)
    converted = load_model(files.original_bf16, torch_dtype=torch.float32)
    assert _mapped_file(converted.blocks[0].attn.q.weight) != str(files.original_bf16)


def _mangled(files, tmp_path, edit):
    state = dict(files.state)
    edit(state)
    path = tmp_path / "mangled.safetensors"
    save_file(state, path)
    return path


def test_strict_validation_lists_everything_in_one_error(files, registered, tmp_path):
    def edit(state):
        for key in ("blocks.0.attn.q.bias", "blocks.1.attn.q.bias", "blocks.1.mlp.2.weight"):
            del state[key]
        state["blocks.0.extra.weight"] = torch.zeros(2)
        state["blocks.0.mlp.0.bias"] = torch.zeros(5)

    path = _mangled(files, tmp_path, edit)
    with pytest.raises(StateDictMismatchError) as caught:
        load_model(path)
    message = str(caught.value)
    assert str(path) in message and "'tiny.dit'" in message and "'original'" in message
    assert "3 missing, 1 unexpected, 1 mis-shaped" in message
    assert "blocks.1.mlp.2.weight" in message and "blocks.0.extra.weight" in message
    assert "blocks.0.mlp.0.bias (5,) vs (64,)" in message
    assert caught.value.missing == ["blocks.0.attn.q.bias", "blocks.1.attn.q.bias", "blocks.1.mlp.2.weight"]
    assert caught.value.unexpected == ["blocks.0.extra.weight"]


def test_validation_truncates_long_lists_with_counts(files, registered, tmp_path):
    path = _mangled(
        files, tmp_path, lambda s: [s.pop(k) for k in [k for k in list(s) if k.startswith("blocks.0.attn")]]
    )
    with pytest.raises(StateDictMismatchError, match=r"missing \(8\): (blocks\.0\.attn\.\S+, ){5}\.\.\. and 3 more"):
        load_model(path)


def test_missing_part_of_a_fused_tensor_is_reported(files, tiny, registered, tmp_path):
    state = dict(files.diffusers_state)
    del state["transformer_blocks.0.scale_proj.bias"]
    path = tmp_path / "partial-diffusers.safetensors"
    save_file(state, path)
    with pytest.raises(
        StateDictMismatchError, match=r"not computable \(1\): blocks\.0\.mod\.lin\.bias .*scale_proj"
    ) as caught:
        load_model(path)
    assert caught.value.missing == caught.value.unexpected == caught.value.mismatched == []
    assert caught.value.uncomputable[0].startswith(
        "blocks.0.mod.lin.bias (tensor 'transformer_blocks.0.scale_proj.bias'"
    )


def test_wrong_family_checkpoint_is_a_detection_error(files, registered, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"text_model.embeddings.weight": torch.zeros(4, 2)}, path)
    with pytest.raises(DetectionError, match=r"no model spec recognises .*other\.safetensors"):
        load_model(path)


def _vram():
    ds_vram = pytest.importorskip("ds_vram")
    if not hasattr(ds_vram, "enable_vram_management") or not hasattr(ds_vram, "VRAMConfig"):
        pytest.skip("ds_vram.enable_vram_management is not available yet")
    return ds_vram


@pytest.mark.parametrize("storage", ["disk", "cpu"])
def test_vram_management_with_a_converted_checkpoint(tiny, files, registered, storage):
    ds_vram = _vram()
    config = ds_vram.VRAMConfig(storage=storage, computation_device="cpu", computation_dtype=torch.float32)
    model = load_model(files.diffusers_file, vram=config)
    if storage == "disk":  # nothing was read yet: the model is still on the meta device
        assert model.blocks[0].attn.q.weight.is_meta
    x = _inputs(files)
    torch.testing.assert_close(model(x), _reference(tiny, files)(x))
    handle = ds_vram.get_vram_handle(model)
    assert set(tiny.dit_spec.never_fp8) <= set(handle.config.never_fp8)
    assert set(tiny.dit_spec.vram_units) <= set(handle.config.units)


class _WithComputedBuffer(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.inner = torch.nn.Linear(2, 2)
        self.register_buffer("freqs", torch.arange(4.0), persistent=False)


def test_tensors_outside_the_state_dict_must_not_stay_on_meta(tiny, tmp_path):
    import dataclasses

    from ds_loader import Detection, LoaderError

    path = tmp_path / "computed.safetensors"
    save_file({"inner.weight": torch.zeros(2, 2), "inner.bias": torch.zeros(2)}, path)
    spec = dataclasses.replace(
        tiny.vae_spec,
        name="tiny.computed",
        model_class=_WithComputedBuffer,
        detect=lambda view: Detection("original", tiny.TinyVAEConfig()),
    )
    with pytest.raises(LoaderError, match=r"spec 'tiny.computed': freqs stayed on the meta device"):
        load_model(path, spec=spec)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_load_to_cuda_casts_on_the_device(tiny, files, registered):
    model = load_model(files.diffusers_file, device="cuda", torch_dtype=torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert model.position_ids.device.type == "cuda" and model.position_ids.dtype == torch.int64
    x = _inputs(files)
    expected = _reference(tiny, files).to(torch.bfloat16)(x.to(torch.bfloat16))
    torch.testing.assert_close(model(x.cuda().to(torch.bfloat16)).cpu(), expected, rtol=2e-2, atol=2e-2)
