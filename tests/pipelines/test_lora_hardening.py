"""LoRA files as they come from the field: diffusers' own alpha metadata, and broken or foreign files.

The diffusers files are written by diffusers and peft themselves (``FluxPipeline.save_lora_weights`` with the
adapter's ``LoraConfig``), and what diffusers applies is the reference. Each broken file is a real file.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ds_loader import CheckpointError
from ds_models_flux import FluxDiT, FluxDiTConfig
from ds_pipelines import FluxImagePipeline, read_lora
from ds_pipelines.lora_info import inspect_lora
from ds_pipelines.lora_io import convert_lora_file, read_lora_layers, save_lora_file
from tests.models.flux.test_dit import diffusers_kwargs, diffusers_to_bfl, make_inputs, randomize, run_diffusers

CONFIG = FluxDiTConfig.tiny()
# diffusers module names, each reached by a different path of ours: q/k/v parts of a fused layer, a part of
# single_blocks.linear1, a whole layer, swapped halves, an embedder.
MODULES = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.to_v",
    "transformer_blocks.1.attn.add_k_proj",
    "transformer_blocks.0.ff.net.2",
    "single_transformer_blocks.0.proj_mlp",
    "single_transformer_blocks.1.proj_out",
    "norm_out.linear",
    "x_embedder",
]


@pytest.fixture(scope="module")
def models():
    from diffusers import FluxTransformer2DModel

    theirs = FluxTransformer2DModel(**diffusers_kwargs(CONFIG)).eval()
    randomize(theirs, seed=7)
    ours = FluxDiT(CONFIG).eval()
    ours.load_state_dict(diffusers_to_bfl(theirs.state_dict()), strict=True)
    return ours, theirs


def pipeline_around(dit: FluxDiT) -> FluxImagePipeline:
    return FluxImagePipeline({"dit": dit}, device="cpu", torch_dtype=torch.float32, progress_bar=False)


def diffusers_lora_file(theirs, folder, **config) -> tuple[object, object]:
    """A LoRA trained in diffusers' way (peft adapter on the diffusers model), saved by diffusers itself.

    Returns the adapted diffusers model (the reference) and the file."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    adapted = copy.deepcopy(theirs)
    # init_lora_weights=False: lora_B random too, as after training.
    adapted.add_adapter(LoraConfig(target_modules=MODULES, init_lora_weights=False, **config))
    with torch.no_grad():  # peft's random init is tiny; make the adapter visible in the output
        for name, parameter in adapted.named_parameters():
            if "lora_" in name:
                parameter.mul_(4.0)
    FluxPipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(adapted),
        transformer_lora_adapter_metadata=adapted.peft_config["default"].to_dict(),
    )
    return adapted, folder / "pytorch_lora_weights.safetensors"


def diffusers_loads(theirs, path) -> object:
    """A fresh diffusers model with ``path`` loaded the way FluxPipeline.load_lora_weights does."""
    from diffusers import FluxPipeline

    model = copy.deepcopy(theirs)
    state, metadata = FluxPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(state, network_alphas=None, transformer=model, metadata=metadata)
    return model


CASES = {
    "alpha r/2": {"r": 4, "lora_alpha": 2},
    "patterns": {
        "r": 4,
        "lora_alpha": 2,
        "alpha_pattern": {"transformer_blocks.0.attn.to_k": 16, "x_embedder": 1},
        "rank_pattern": {"single_transformer_blocks.1.proj_out": 2, "transformer_blocks.0.ff.net.2": 6},
    },
    "rslora": {"r": 4, "lora_alpha": 3, "use_rslora": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_file_diffusers_saved_gives_diffusers_output(models, tmp_path, case):
    ours, theirs = models
    adapted, path = diffusers_lora_file(theirs, tmp_path, **CASES[case])
    with safe_open(path, "pt") as handle:
        assert "lora_adapter_metadata" in handle.metadata()
        assert not any(key.endswith(".alpha") for key in handle.keys())  # noqa: SIM118 - safe_open has no __iter__
    inputs = make_inputs(CONFIG)
    with torch.no_grad():
        reference = run_diffusers(adapted, inputs)
        torch.testing.assert_close(run_diffusers(diffusers_loads(theirs, path), inputs), reference)
        assert (reference - run_diffusers(theirs, inputs)).abs().max() > 1e-2
        for fuse in (False, True):
            dit = copy.deepcopy(ours)
            pipeline_around(dit).load_lora(path, fuse=fuse)
            torch.testing.assert_close(dit(**inputs), reference, rtol=1e-4, atol=1e-5)
    # Converting keeps the delta: the alphas travel as .alpha tensors, not as the diffusers metadata.
    converted = convert_lora_file(path, tmp_path / "converted.safetensors", to="comfyui", model=ours)
    with safe_open(converted, "pt") as handle:
        assert "lora_adapter_metadata" not in handle.metadata()
    dit = copy.deepcopy(ours)
    pipeline_around(dit).load_lora(converted)
    with torch.no_grad():
        torch.testing.assert_close(dit(**inputs), reference, rtol=1e-4, atol=1e-5)


def test_inspect_reports_the_alpha_from_the_metadata(models, tmp_path):
    _, path = diffusers_lora_file(models[1], tmp_path, r=4, lora_alpha=2, alpha_pattern={"x_embedder": 8})
    info = inspect_lora(path)
    assert info.alphas == {2.0: len(MODULES) - 1, 8.0: 1}
    assert info.ranks == {4: len(MODULES)}


def test_our_diffusers_export_means_the_same_to_diffusers(models, tmp_path):
    """Our export folds alpha / rank into lora_B; its lora_adapter_metadata must then say alpha = rank for every
    module (ranks differ here, so rank_pattern and alpha_pattern are needed), or diffusers would scale again."""
    ours, theirs = models
    generator = torch.Generator().manual_seed(3)
    layers, deltas = {}, {}
    for layer, rank, alpha in (
        ("double_blocks.0.img_attn.qkv", 4, 2.0),
        ("single_blocks.1.linear2", 2, 8.0),
        ("img_in", 4, 1.0),
    ):
        weight = ours.get_submodule(layer).weight
        down = torch.randn(rank, weight.shape[1], generator=generator)
        up = torch.randn(weight.shape[0], rank, generator=generator)
        layers[layer] = (down, up, alpha)
        deltas[layer] = alpha / rank * up @ down
    path = save_lora_file(layers, tmp_path / "ours.safetensors", format="diffusers", family="flux.1")
    with safe_open(path, "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == metadata["transformer.lora_alpha"] == 4
    assert metadata["transformer.rank_pattern"] == metadata["transformer.alpha_pattern"]
    assert metadata["transformer.rank_pattern"] == {"single_transformer_blocks.1.proj_out": 2}

    expected = copy.deepcopy(ours)
    with torch.no_grad():
        for layer, delta in deltas.items():
            expected.get_submodule(layer).weight += delta
    inputs = make_inputs(CONFIG)
    dit = copy.deepcopy(ours)
    pipeline_around(dit).load_lora(path)
    with torch.no_grad():
        reference = expected(**inputs)
        torch.testing.assert_close(dit(**inputs), reference, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            run_diffusers(diffusers_loads(theirs, path), inputs), reference, rtol=1e-4, atol=1e-5
        )
    for layer, (down, up, alpha) in read_lora_layers(path, family="flux.1").items():
        torch.testing.assert_close(alpha / down.shape[0] * up @ down, deltas[layer], rtol=1e-5, atol=1e-6)


def test_a_peft_folder_takes_alpha_from_adapter_config(models, tmp_path):
    ours, _ = models
    weight = ours.get_submodule("img_in").weight
    generator = torch.Generator().manual_seed(4)
    down, up = (
        torch.randn(4, weight.shape[1], generator=generator),
        torch.randn(weight.shape[0], 4, generator=generator),
    )
    save_file(
        {"base_model.model.img_in.lora_A.weight": down, "base_model.model.img_in.lora_B.weight": up},
        tmp_path / "adapter_model.safetensors",
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 1}))
    dit = copy.deepcopy(ours)
    pipeline_around(dit).load_lora(tmp_path / "adapter_model.safetensors", fuse=True)
    torch.testing.assert_close(dit.img_in.weight, weight + 0.25 * up @ down)


def _lora_state(ours, layers=("double_blocks.0.img_attn.qkv", "img_in"), rank=2) -> dict[str, torch.Tensor]:
    state = {}
    for layer in layers:
        weight = ours.get_submodule(layer).weight
        state[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(rank, weight.shape[1])
        state[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(weight.shape[0], rank)
        state[f"diffusion_model.{layer}.alpha"] = torch.tensor(float(rank))
    return state


@pytest.mark.parametrize(
    ("suffix", "key", "value"),
    [
        (".safetensors", "diffusion_model.img_in.lora_up.weight", float("nan")),
        (".safetensors", "diffusion_model.img_in.alpha", float("inf")),
        (".pt", "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight", float("-inf")),
    ],
)
def test_a_non_finite_lora_tensor_names_file_and_key(models, tmp_path, suffix, key, value):
    ours, _ = models
    state = _lora_state(ours)
    if state[key].dim():
        state[key][0, 1] = value
    else:
        state[key] = torch.tensor(value)
    path = tmp_path / f"broken{suffix}"
    if suffix == ".pt":
        torch.save(state, path)
    else:
        save_file(state, path)
    message = rf"broken\{suffix}: tensor '{key.replace('.', '[.]')}' holds NaN or infinite values"
    for read in (
        lambda: pipeline_around(copy.deepcopy(ours)).load_lora(path),
        lambda: read_lora(path),
        lambda: inspect_lora(path),
        lambda: read_lora_layers(path, family="flux.1"),
        lambda: convert_lora_file(path, tmp_path / "out.safetensors", to="kohya", family="flux.1"),
    ):
        with pytest.raises(ValueError, match=message):
            read()
    assert not (tmp_path / "out.safetensors").exists()


def test_nan_in_the_adapter_metadata_is_named(models, tmp_path):
    ours, _ = models
    state = {k: v for k, v in _lora_state(ours, layers=("img_in",)).items() if not k.endswith(".alpha")}
    metadata = {"lora_adapter_metadata": '{"transformer.r": 2, "transformer.lora_alpha": NaN}'}
    state = {k.replace("diffusion_model.", "transformer.").replace("lora_down", "lora_A"): v for k, v in state.items()}
    state = {k.replace("lora_up", "lora_B"): v for k, v in state.items()}
    save_file(state, tmp_path / "nan-alpha.safetensors", metadata=metadata)
    with pytest.raises(
        ValueError, match=r"nan-alpha\.safetensors: LoRA key 'transformer\.img_in\.lora_B\.weight'.*nan"
    ):
        pipeline_around(copy.deepcopy(ours)).load_lora(tmp_path / "nan-alpha.safetensors")


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".bin"])
def test_a_refused_pickle_lora_says_which_file_why_and_how_to_convert(models, tmp_path, suffix):
    marker = tmp_path / "payload-ran"
    path = tmp_path / f"style{suffix}"
    with open(path, "wb") as handle:
        pickle.dump({"double_blocks.0.img_attn.qkv.lora_A.weight": _Payload(str(marker))}, handle, protocol=2)
    for read in (
        lambda: pipeline_around(copy.deepcopy(models[0])).load_lora(path),
        lambda: read_lora(path),
        lambda: inspect_lora(path),
        lambda: read_lora_layers(path, family="flux.1"),
        lambda: convert_lora_file(path, tmp_path / "out.safetensors", to="comfyui", family="flux.1"),
    ):
        with pytest.raises(CheckpointError) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(f"{path}: refused to load this LoRA file: it holds `"), message
        assert "not only tensors" in message and "style.safetensors" in message
        assert "weights_only` set to `False" not in message and "\x1b" not in message
    assert not marker.exists()


def test_a_lora_for_another_size_names_file_key_and_layer(models, tmp_path):
    ours, _ = models
    dim = ours.get_submodule("img_in").weight.shape[0]
    # A kohya/ComfyUI LoRA of a model twice as wide: its qkv up matrix has 6 * dim rows.
    state = _lora_state(ours)
    state["diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight"] = torch.randn(6 * dim, 2)
    save_file(state, tmp_path / "wider.safetensors")
    with pytest.raises(ValueError) as caught:
        pipeline_around(copy.deepcopy(ours)).load_lora(tmp_path / "wider.safetensors")
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'wider.safetensors'}: LoRA key ")
    assert "'diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight'" in message
    assert f"our layer 'double_blocks.0.img_attn.qkv' (Linear, weight ({3 * dim}, {dim}))" in message
    assert f"its up matrix has {6 * dim} rows, where the layer has {3 * dim} outputs" in message
    assert "another model, or for another size" in message

    # diffusers names: a q part of the right height, a k part whose down matrix takes twice the inputs.
    generator = torch.Generator().manual_seed(0)
    diffusers_state = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, dim, generator=generator),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(dim, 2, generator=generator),
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.randn(2, 2 * dim, generator=generator),
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.randn(dim, 2, generator=generator),
    }
    save_file(diffusers_state, tmp_path / "other.safetensors")
    for fuse in (False, True):
        with pytest.raises(ValueError) as caught:
            pipeline_around(copy.deepcopy(ours)).load_lora(tmp_path / "other.safetensors", fuse=fuse)
        message = str(caught.value)
        assert "other.safetensors: LoRA key 'transformer.transformer_blocks.0.attn.to_k.lora_B.weight'" in message
        assert "our layer 'double_blocks.0.img_attn.qkv'" in message
        assert f"'transformer.transformer_blocks.0.attn.to_k.lora_A.weight' has shape (2, {2 * dim})" in message
        assert "Sizes of tensors" not in message and "another model" in message

    # A part of the wrong height lands in its rows of the fused layer; the message says which part.
    diffusers_state["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"] = torch.randn(2, dim)
    diffusers_state["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.randn(dim // 2, 2)
    save_file(diffusers_state, tmp_path / "part.safetensors")
    with pytest.raises(ValueError, match=rf"where its part 1 \(rows {dim}:{2 * dim}\) has {dim} outputs"):
        pipeline_around(copy.deepcopy(ours)).load_lora(tmp_path / "part.safetensors")


def test_up_and_down_of_different_rank_is_a_broken_file(models, tmp_path):
    ours, _ = models
    state = _lora_state(ours, layers=("img_in",))
    state["diffusion_model.img_in.lora_up.weight"] = state["diffusion_model.img_in.lora_up.weight"][:, :1]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "ranks.safetensors")
    with pytest.raises(ValueError, match=r"ranks\.safetensors: LoRA key 'diffusion_model\.img_in\.lora_up\.weight'"):
        pipeline_around(copy.deepcopy(ours)).load_lora(tmp_path / "ranks.safetensors")
