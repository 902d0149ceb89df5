"""LoRA files in every format change the FLUX.1 DiT exactly as W + scale * alpha/rank * B @ A would."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from ds_models_flux import FluxDiT, FluxDiTConfig
from ds_pipelines import FluxImagePipeline
from tests.models.flux.test_dit import diffusers_kwargs, diffusers_to_bfl, make_inputs, randomize, run_diffusers

CONFIG = FluxDiTConfig.tiny()
RANK = 2


@pytest.fixture(scope="module")
def models():
    from diffusers import FluxTransformer2DModel

    theirs = FluxTransformer2DModel(**diffusers_kwargs(CONFIG)).eval()
    randomize(theirs, seed=5)
    ours = FluxDiT(CONFIG).eval()
    ours.load_state_dict(diffusers_to_bfl(theirs.state_dict()), strict=True)
    return ours, theirs


def pipeline_around(dit: FluxDiT) -> FluxImagePipeline:
    return FluxImagePipeline({"dit": dit}, device="cpu", torch_dtype=torch.float32, progress_bar=False)


def random_pair(weight: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, weight.shape[1], generator=generator) * 0.5
    up = torch.randn(weight.shape[0], RANK, generator=generator) * 0.5
    return down, up


def fused_dit(dit: FluxDiT, deltas: dict[str, torch.Tensor]) -> FluxDiT:
    result = copy.deepcopy(dit)
    with torch.no_grad():
        for layer, delta in deltas.items():
            result.get_submodule(layer).weight += delta
    return result


OUR_LAYERS = [
    "double_blocks.0.img_attn.qkv",
    "double_blocks.1.txt_mlp.2",
    "single_blocks.0.linear1",
    "single_blocks.1.modulation.lin",
    "final_layer.adaLN_modulation.1",
    "img_in",
]


@pytest.mark.parametrize("style", ["peft", "peft-default", "comfyui", "kohya"])
def test_formats_on_our_layer_names(models, tmp_path, style):
    ours, _ = models
    state, deltas, alpha, scale = {}, {}, 4.0, 0.7
    for index, layer in enumerate(OUR_LAYERS):
        down, up = random_pair(ours.get_submodule(layer).weight, index)
        if style == "peft":
            state[f"{layer}.lora_A.weight"], state[f"{layer}.lora_B.weight"] = down, up
            factor = 1.0
        elif style == "peft-default":  # DiffSynth's own training output
            state[f"transformer.{layer}.lora_A.default.weight"] = down
            state[f"transformer.{layer}.lora_B.default.weight"] = up
            factor = 1.0
        else:
            name = f"diffusion_model.{layer}" if style == "comfyui" else "lora_unet_" + layer.replace(".", "_")
            state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = down, up
            state[f"{name}.alpha"] = torch.tensor(alpha)
            factor = alpha / RANK
        deltas[layer] = scale * factor * up @ down
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(RANK, 4)  # CLIP part
    state["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(4, RANK)
    path = tmp_path / "style.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)

    dit = copy.deepcopy(ours)
    pipe = pipeline_around(dit)
    inputs = make_inputs(CONFIG)
    base = dit(**inputs)
    with pytest.warns(UserWarning, match="1 LoRA entries match no layer"):
        pipe.load_lora(path, scale=scale)
    expected = fused_dit(ours, deltas)(**inputs)
    torch.testing.assert_close(dit(**inputs), expected, rtol=1e-5, atol=1e-5)
    assert (expected - base).abs().max() > 1e-2
    pipe.clear_lora()
    assert torch.equal(dit(**inputs), base)
    fused = copy.deepcopy(ours)
    with pytest.warns(UserWarning):
        pipeline_around(fused).load_lora(path, scale=scale, fuse=True)
    torch.testing.assert_close(fused(**inputs), expected, rtol=1e-5, atol=1e-5)


def test_diffusers_format_with_split_qkv_matches_diffusers(models, tmp_path):
    """diffusers' separate q/k/v (and single-block proj_mlp) LoRAs land on the fused BFL layers exactly."""
    ours, theirs = models
    modules = [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.1.attn.add_k_proj",
        "transformer_blocks.0.ff.net.0.proj",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.1.proj_out",
        "norm_out.linear",
        "x_embedder",
        "context_embedder",
        "time_text_embed.guidance_embedder.linear_1",
    ]
    state, reference = {}, copy.deepcopy(theirs)
    with torch.no_grad():
        for index, module in enumerate(modules):
            weight = reference.get_submodule(module).weight
            down, up = random_pair(weight, 100 + index)
            state[f"transformer.{module}.lora_A.weight"], state[f"transformer.{module}.lora_B.weight"] = down, up
            weight += 0.9 * up @ down
    path = tmp_path / "diffusers-lora.safetensors"
    save_file(state, path)
    dit = copy.deepcopy(ours)
    pipeline_around(dit).load_lora(path, scale=0.9)
    inputs = make_inputs(CONFIG)
    with torch.no_grad():
        expected = run_diffusers(reference, inputs)
        assert (expected - run_diffusers(theirs, inputs)).abs().max() > 1e-2
        torch.testing.assert_close(dit(**inputs), expected, rtol=1e-4, atol=1e-5)


def test_bad_lora_files(models, tmp_path):
    ours, _ = models
    pipe = pipeline_around(copy.deepcopy(ours))
    with pytest.raises(FileNotFoundError, match="LoRA file not found"):
        pipe.load_lora(tmp_path / "absent.safetensors")
    save_file({"unet.something.weight": torch.zeros(2, 2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="no LoRA layer fits FluxDiT"):
        pipe.load_lora(tmp_path / "foreign.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"unsupported LoRA file type '.txt'"):
        pipe.load_lora(tmp_path / "notes.txt")


def test_pickled_lora_with_a_payload_is_refused(models, tmp_path):
    import os
    import pickle

    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as handle:
        pickle.dump({"double_blocks.0.img_attn.qkv.lora_A.weight": Payload()}, handle)
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        pipeline_around(copy.deepcopy(models[0])).load_lora(tmp_path / "evil.pt")
    assert not marker.exists()
