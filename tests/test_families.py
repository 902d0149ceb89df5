"""The family contract, run over every registered family: what the shared layers may rely on when they read a
``FamilyDescriptor`` instead of naming a family.

For each family: the descriptor is complete and its import strings resolve to a pipeline and a training adapter of
that family; every released preset builds on ``meta`` at its released DiT size; LoRA names round-trip between our,
diffusers and kohya forms; each preset's tiny DiT (``build_tiny_components``) saved where its release keeps it routes
to the family's pipeline. A family added later is checked by this module as it is; it only needs its released DiT
sizes in the table below.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ds_loader import FamilyDescriptor, list_families
from ds_loader.detect import registry as spec_registry
from ds_loader.families import KINDS, LoraTarget, Preset, schedule_template
from ds_pipelines.lora_io import guess_lora_family

FAMILIES = list_families()
FAMILY_IDS = [family.id for family in FAMILIES]


# Released DiT parameter counts, per DiT file of a preset (the two A14B experts each), from the model cards and
# the architectures' layer shapes (/work/shared/research/model-families.md: FLUX.1 ~11.9B; Wan 2.1 1.3B ~1.4B,
# 14B ~14.3B, I2V 14B ~16.4B (its image-conditioning layers); Wan 2.2 TI2V-5B ~5.0B). schnell and the 2.2 I2V
# experts differ from their siblings by a few million parameters (no guidance embedding; no CLIP projection).
RELEASED_DIT_PARAMETERS: dict[str, float] = {
    "flux.1-dev": 11.90e9,
    "flux.1-schnell": 11.89e9,
    "flux.1-krea-dev": 11.90e9,
    "flux.1-kontext-dev": 11.90e9,
    "flux.1-fill-dev": 11.90e9,
    "wan2.1-t2v-1.3b": 1.42e9,
    "wan2.1-t2v-14b": 14.29e9,
    "wan2.1-i2v-14b-480p": 16.39e9,
    "wan2.1-i2v-14b-720p": 16.39e9,
    "wan2.1-flf2v-14b-720p": 16.40e9,
    "wan2.2-t2v-a14b": 14.29e9,
    "wan2.2-i2v-a14b": 14.29e9,
    "wan2.2-ti2v-5b": 5.00e9,
    # Z-Image: "6B" on the model cards, 6.15B for Turbo and base (the same architecture; the bf16 transformer is
    # 12.3 GB); Omni-Base adds the SigLIP path (siglip_embedder and two siglip_refiner blocks, ~0.36B) to it, per
    # diffusers' ZImageTransformer2DModel(siglip_feat_dim=1152): its card gives no separate count.
    "z-image-turbo": 6.15e9,
    "z-image": 6.15e9,
    "z-image-omni-base": 6.51e9,
    # Qwen-Image: "20B" on the model cards; the layer shapes of transformer/ (60 dual-stream blocks of width 3072)
    # give 20.43B, the same for every release (Edit-2511's zero_cond_t adds no weights).
    "qwen-image": 20.43e9,
    "qwen-image-2512": 20.43e9,
    "qwen-image-edit": 20.43e9,
    "qwen-image-edit-2509": 20.43e9,
    "qwen-image-edit-2511": 20.43e9,
}
TOLERANCE = 0.01
LORA_METADATA_KEYS = ("ss_network_module", "ss_base_model_version", "modelspec.architecture")
# Families whose diffusers LoRA names overlap: FLUX.1's double-block attention is spelled like Qwen-Image's. The other
# family may recognise some of these layers, never all; guess_lora_family decides by which recognises more.
SHARED_LORA_NAMES: dict[str, tuple[str, ...]] = {"flux.1": ("qwen-image",)}
_BLOCK_LAYER = re.compile(r"\.\d+\.")  # a layer inside a repeated block: "double_blocks.0.img_attn.qkv"

pytestmark = pytest.mark.usefixtures("one_thread")


def _presets(released_only: bool = False) -> list:
    return [
        pytest.param(family, preset, id=preset.name)
        for family in FAMILIES
        for preset in family.presets.values()
        if not (released_only and preset.is_local)
    ]


@pytest.fixture(params=FAMILIES, ids=FAMILY_IDS)
def family(request) -> FamilyDescriptor:
    return request.param


def tiny_dits(family: FamilyDescriptor, preset: Preset) -> dict[str, nn.Module]:
    """The preset's DiT(s) at the family's tiny test size (``build_tiny_components``), with random weights."""
    if family.build_tiny_components is None:
        pytest.fail(f"family {family.id!r}: set build_tiny_components so tests can build its models at tiny size")
    components = dict(family.build_tiny_components(preset))
    dits = {name: module.eval() for name, module in components.items() if name.startswith("dit")}
    assert dits, f"{preset.name}: build_tiny_components gave no DiT"
    return dits


def test_families_are_registered():
    assert {"flux.1", "wan"} <= set(FAMILY_IDS)
    assert len(FAMILY_IDS) == len(set(FAMILY_IDS))


# ---------------------------------------------------------------------------------------------- the descriptor
def test_descriptor_is_complete(family):
    assert family.kind in KINDS
    assert family.title and family.description
    assert family.presets, "a family needs at least one preset"
    assert len(family.default_size) == 2 and all(isinstance(side, int) and side > 0 for side in family.default_size)
    for name, preset in family.presets.items():
        assert preset.files and "dit" in "".join(preset.files), f"{name}: no DiT file"
        layout = family.token_layout(preset)
        assert 0 < layout.tokens_per_pixel < 1 and layout.temporal_compression >= 1, name
        if family.kind == "image":
            assert layout.temporal_compression == 1, name
    for name, template in family.schedules.items():
        assert schedule_template(name) is template, f"schedule {name!r} is shadowed by another family's"


def test_detection_specs_belong_to_the_family(family):
    specs = {spec.name: spec for spec in spec_registry.specs()}
    missing = set(family.dit_specs) | set(family.component_specs)
    missing -= set(specs)
    assert not missing, f"{family.id}: specs {sorted(missing)} are not registered under ds.models"
    for name in family.dit_specs:
        assert specs[name].family == family.id, f"spec {name} says family {specs[name].family!r}"
        assert family.component_specs.get(name, "").startswith("dit"), f"{name} must name a DiT component"


def test_pipeline_imports_and_is_the_familys(family):
    from ds_pipelines import Pipeline

    pipeline = family.pipeline_class()
    assert isinstance(pipeline, type) and issubclass(pipeline, Pipeline), family.pipeline
    assert pipeline.family == family.id
    assert isinstance(inspect.getattr_static(pipeline, "predict", None), staticmethod), (
        f"{family.pipeline}: predict(model, latents, sigmas, conditions) must be a staticmethod"
    )
    assert list(inspect.signature(pipeline.predict).parameters)[:4] == ["model", "latents", "sigmas", "conditions"]
    preset_options = {option for preset in family.presets.values() for option in preset.sampling}
    call = inspect.signature(pipeline.__call__).parameters
    unknown = preset_options - set(call) - set(pipeline.default_options)
    assert not unknown, f"{family.id} presets set options {sorted(unknown)} its pipeline's __call__ does not take"


def test_training_adapter_imports_and_is_the_familys(family):
    from ds_train import TrainingAdapter

    adapter = family.training_adapter_class()
    assert isinstance(adapter, type) and issubclass(adapter, TrainingAdapter), family.training_adapter
    assert adapter.family == family.id
    assert isinstance(adapter.options, Mapping), "options: name -> (type, help)"


def test_families_claim_distinct_folders():
    for attribute in ("dit_specs", "diffusers_classes"):
        owners: dict[str, str] = {}
        for family in FAMILIES:
            for name in getattr(family, attribute):
                assert name not in owners, f"{attribute} {name!r} is claimed by {owners[name]} and {family.id}"
                owners[name] = family.id


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(("family", "preset"), _presets())
def test_preset_builds_on_meta_at_its_released_size(family, preset):
    try:
        with torch.device("meta"):
            components = dict(family.build_components(preset))
    except ValueError:
        if preset.is_local:  # a demo shipped as files: sized from its headers, not from a released config
            pytest.skip(f"{preset.name} has no released configuration")
        raise
    assert set(components) <= set(preset.files), f"{preset.name}: built {sorted(components)} of {sorted(preset.files)}"
    dits = {name: module for name, module in components.items() if name.startswith("dit")}
    assert dits, f"{preset.name}: build_components gave no DiT"
    if family.build_tiny_components is not None:
        tiny = family.build_tiny_components(preset)
        assert set(tiny) == set(components), f"{preset.name}: tiny components {sorted(tiny)} differ from the released"
    assert all(p.is_meta for module in components.values() for p in module.parameters()), "built off meta"
    assert preset.name in RELEASED_DIT_PARAMETERS, (
        f"add {preset.name}'s released DiT parameter count to RELEASED_DIT_PARAMETERS in {Path(__file__).name}"
    )
    expected = RELEASED_DIT_PARAMETERS[preset.name]
    for name, dit in dits.items():
        count = sum(parameter.numel() for parameter in dit.parameters())
        assert abs(count - expected) <= TOLERANCE * expected, f"{preset.name} {name}: {count:,} parameters"


# ---------------------------------------------------------------------------------------------- LoRA names
def _lora_layers(dit: nn.Module, family: FamilyDescriptor) -> dict[str, list[str]]:
    """Our Linear layers that a diffusers LoRA can target, with their diffusers module names."""
    layers = {}
    for name, module in dit.named_modules():
        if isinstance(module, nn.Linear):
            names = family.lora.to_diffusers(name)
            if names:
                layers[name] = names
    return layers


@pytest.mark.parametrize(("family", "preset"), _presets())
def test_lora_names_round_trip(family, preset):
    naming = family.lora
    layers = {}
    for dit in tiny_dits(family, preset).values():
        layers |= _lora_layers(dit, family)
    assert layers, f"{family.id}: lora.to_diffusers maps none of the tiny DiT's Linear layers"
    assert any(_BLOCK_LAYER.search(layer) for layer in layers), "no block layer maps to diffusers"
    for layer, diffusers_names in layers.items():
        targets = [naming.from_diffusers(name) for name in diffusers_names]
        assert all(isinstance(target, LoraTarget) for target in targets), (layer, diffusers_names, targets)
        assert {target.layer for target in targets} == {layer}, (layer, diffusers_names, targets)
        if len(targets) > 1:  # a fused layer: each diffusers module covers its own part of the output rows
            assert sorted(target.part for target in targets) == list(range(len(targets))), (layer, targets)
        assert naming.from_flat(layer.replace(".", "_")) == layer, layer
        if _BLOCK_LAYER.search(layer):
            assert naming.recognises(layer), f"lora.sign misses our block layer {layer}"
            assert naming.recognises("lora_unet_" + layer.replace(".", "_")), f"sign misses kohya {layer}"
            assert all(naming.recognises(name) for name in diffusers_names), f"sign misses {diffusers_names}"
    for key in LORA_METADATA_KEYS:
        assert naming.metadata.get(key), f"{family.id}: lora.metadata lacks {key}"


@pytest.mark.parametrize(("family", "preset"), _presets())
def test_lora_signs_do_not_claim_other_families_layers(family, preset):
    ours = [
        layer
        for dit in tiny_dits(family, preset).values()
        for layer in _lora_layers(dit, family)
        if _BLOCK_LAYER.search(layer)
    ]
    for other in list_families():  # at call time: a family registered in code is checked as well
        if other.id == family.id:
            continue
        claimed = [layer for layer in ours if other.lora.recognises(layer)]
        if family.id in SHARED_LORA_NAMES.get(other.id, ()):
            assert len(claimed) < len(ours), f"{other.id}'s lora.sign recognises every {family.id} layer"
        else:
            assert not claimed, f"{other.id}'s lora.sign recognises {family.id} layers such as {claimed[:3]}"
        for convention in (ours, [name for layer in ours for name in family.lora.to_diffusers(layer)]):
            assert guess_lora_family(convention) == family.id, f"{family.id} LoRA guessed as another family"


# ---------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize(("family", "preset"), _presets())
def test_a_tiny_saved_dit_routes_to_the_familys_pipeline(family, preset, tmp_path):
    """Each DiT of the preset, saved where its release keeps it (its file pattern made concrete): the file and the
    folder route to the family's pipeline."""
    from ds_pipelines import family_for, pipeline_for

    folder = tmp_path / "model"
    files = []
    torch.manual_seed(0)
    for name, dit in tiny_dits(family, preset).items():
        with torch.no_grad():
            for parameter in dit.parameters():
                parameter.normal_(0, 0.02)
        file = folder / preset.files[name].pattern.replace("*", "")
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({key: tensor.contiguous() for key, tensor in dit.state_dict().items()}, str(file))
        files.append(file)
    expected = (family.pipeline.rpartition(":")[2], family.kind)
    for path in (*files, folder, str(folder)):
        assert pipeline_for(path) == expected, path
        assert family_for(path).id == family.id, path


def test_diffusers_folders_route_by_class_name(family, tmp_path):
    from ds_pipelines import family_for

    assert family.diffusers_classes, f"{family.id}: name the diffusers classes of its folders"
    for class_name in family.diffusers_classes:
        folder = tmp_path / class_name
        config = folder / ("model_index.json" if class_name.endswith("Pipeline") else "transformer/config.json")
        config.parent.mkdir(parents=True)
        config.write_text(json.dumps({"_class_name": class_name}))
        assert family_for(folder).id == family.id, class_name
