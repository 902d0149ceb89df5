"""Detection: matches with inferred configs, ambiguity, helpful no-match errors, registration."""

from __future__ import annotations

import dataclasses
import logging
import sys
from importlib.metadata import EntryPoint

import pytest
import torch
from safetensors.torch import save_file

from ds_loader import (
    ENTRY_POINT_GROUP,
    AmbiguousModelError,
    Detection,
    DetectionError,
    Mismatch,
    ModelSpec,
    SpecRegistry,
    detect,
    load_model,
    registry,
)


@pytest.mark.parametrize(
    ("layout", "fmt"), [("original", "original"), ("comfy", "comfyui"), ("diffusers_file", "diffusers")]
)
def test_each_format_is_recognised_with_its_config(tiny, files, registered, layout, fmt):
    (match,) = detect(getattr(files, layout))
    assert match.spec is tiny.dit_spec and match.format == fmt
    assert match.config == tiny.TinyConfig(dim=32, depth=2, in_channels=8, tokens=4)


def test_config_is_inferred_from_shapes(tiny, tmp_path, registered):
    config = tiny.TinyConfig(dim=16, depth=3, in_channels=4, tokens=5)
    path = tmp_path / "other-size.safetensors"
    save_file(tiny.random_state(tiny.TinyDiT(config), seed=5), path)
    (match,) = detect(path)
    assert match.config == config
    assert load_model(path).blocks[2].mlp[2].weight.shape == (16, 32)


def test_one_folder_many_models(files, registered):
    matches = detect(files.repo)
    assert [(m.spec.name, m.format, m.checkpoint.component) for m in matches] == [
        ("tiny.dit", "diffusers", "transformer"),
        ("tiny.vae", "original", "vae"),
    ]
    assert matches[0].describe() == "tiny.dit (format 'diffusers' in transformer/)"


def test_two_specs_claiming_one_file_is_ambiguous(tiny, files, registered):
    twin = dataclasses.replace(tiny.dit_spec, name="tiny.dit-twin")
    registry.register(twin)
    try:
        assert [m.spec.name for m in detect(files.original)] == ["tiny.dit", "tiny.dit-twin"]
        with pytest.raises(AmbiguousModelError, match=r"several models match: tiny\.dit \(.*tiny\.dit-twin .*spec="):
            load_model(files.original)
        assert isinstance(load_model(files.original, spec="tiny.dit-twin"), tiny.TinyDiT)
    finally:
        registry.unregister(twin.name)


def test_no_match_lists_the_closest_specs_and_why(tmp_path, tiny):
    path = tmp_path / "mystery.safetensors"
    save_file({"blocks.0.weird.weight": torch.zeros(2), "head.weight": torch.zeros(2)}, path)
    with pytest.raises(DetectionError) as caught:
        detect(path, specs=[tiny.vae_spec, tiny.dit_spec])
    message = str(caught.value)
    assert str(path) in message and "first keys: ['blocks.0.weird.weight', 'head.weight']" in message
    lines = message.splitlines()
    assert lines[1].startswith("  - tiny.dit (50% close): no img_in.weight or x_embedder.weight")
    assert lines[2].startswith("  - tiny.vae (0% close): no encoder.0.weight")


def test_no_specs_at_all(files):
    with pytest.raises(DetectionError, match=r"no model specs are registered; install a family package"):
        detect(files.original, specs=[])


def test_broken_or_inconsistent_detectors_do_not_hide_other_matches(tiny, files, caplog):
    def crashes(view):
        raise KeyError("img_in.weight")

    base = dict(model_class=tiny.TinyDiT, config_class=tiny.TinyConfig, family="x", formats={"original": None})
    broken = [
        ModelSpec(name="x.crash", detect=crashes, **base),
        ModelSpec(name="x.format", detect=lambda v: Detection("nope", tiny.TinyConfig()), **base),
        ModelSpec(name="x.config", detect=lambda v: Detection("original", {"dim": 3}), **base),
        ModelSpec(name="x.other", detect=lambda v: "yes", **base),
    ]
    with caplog.at_level(logging.WARNING, logger="ds_loader"):
        (match,) = detect(files.original, specs=[*broken, tiny.dit_spec])
    assert match.spec is tiny.dit_spec
    assert "detect of spec x.crash failed" in caplog.text
    with pytest.raises(DetectionError) as caught:
        detect(files.original, specs=broken)
    message = str(caught.value)
    assert "x.crash (0% close): its detect function raised KeyError: 'img_in.weight'" in message
    assert "detect named format 'nope', which the spec does not define" in message
    assert "detect returned a dict, not a TinyConfig" in message
    assert "detect returned 'yes' instead of a Detection or Mismatch" in message


def test_spec_validation(tiny):
    base = dict(model_class=tiny.TinyDiT, config_class=tiny.TinyConfig, family="x", detect=lambda v: Mismatch("no"))
    with pytest.raises(ValueError, match=r"formats must name at least one format"):
        ModelSpec(name="x.a", formats={}, **base)
    with pytest.raises(TypeError, match=r"format 'f' maps to 3, not a Recipe or None"):
        ModelSpec(name="x.a", formats={"f": 3}, **base)
    with pytest.raises(ValueError, match=r"name='' must be a non-empty string"):
        ModelSpec(name="", formats={"f": None}, **base)
    spec = ModelSpec(name="x.a", formats={"f": None}, **base)
    assert spec.model == "a"
    with pytest.raises(ValueError, match=r"spec 'x.a' has no format 'g'; it knows \['f'\]"):
        spec.recipe("g")
    with pytest.raises(TypeError, match=r"spec 'x.a' needs a TinyConfig, got dict"):
        spec.create({})


def test_registry_from_entry_points(tiny, tmp_path, monkeypatch, caplog):
    module = tmp_path / "tiny_family_plugin.py"
    module.write_text(
        "SPECS = []\nJUNK = [1, 2]\n"
        "def specs():\n    return SPECS\n"
        "def broken():\n    raise ImportError('missing dependency xyz')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [
        EntryPoint(name="tiny", value="tiny_family_plugin:specs", group=ENTRY_POINT_GROUP),
        EntryPoint(name="gone", value="no_such_module_here:SPECS", group=ENTRY_POINT_GROUP),
        EntryPoint(name="broken", value="tiny_family_plugin:broken", group=ENTRY_POINT_GROUP),
        EntryPoint(name="junk", value="tiny_family_plugin:JUNK", group=ENTRY_POINT_GROUP),
    ]
    import tiny_family_plugin

    tiny_family_plugin.SPECS.extend([tiny.dit_spec, tiny.vae_spec])
    local = SpecRegistry(discover=lambda: points)
    with caplog.at_level(logging.WARNING, logger="ds_loader"):
        assert [s.name for s in local.specs()] == ["tiny.dit", "tiny.vae"]
    assert "cannot load model specs from entry point gone" in caplog.text
    assert "entry point broken (tiny_family_plugin:broken): missing dependency xyz" in caplog.text
    assert "entry point junk (tiny_family_plugin:JUNK) gave 1, not a ModelSpec" in caplog.text
    assert local.get("tiny.vae") is tiny.vae_spec
    with pytest.raises(KeyError, match=r"no model spec named 'tiny.nope'; registered: \['tiny.dit', 'tiny.vae'\]"):
        local.get("tiny.nope")
    with pytest.raises(ValueError, match=r"'tiny.dit' is already registered; pass replace=True"):
        local.register(dataclasses.replace(tiny.dit_spec))
    sys.modules.pop("tiny_family_plugin", None)


def test_default_registry_reads_the_ds_models_group():
    # The installed distributions register nothing yet; the group name is the documented one.
    assert ENTRY_POINT_GROUP == "ds.models"
    assert all(isinstance(spec, ModelSpec) for spec in registry.specs())
