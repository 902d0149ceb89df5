"""ds_train on the tiny Qwen-Image repositories: the adapter's choices (LoRA targets, upstream's training sigmas,
guards), a LoRA that changes the output, edit samples encoded as the edit pipeline encodes them (and an empty prompt
that still sees the edit images), and blockwise ControlNet training that changes the ControlNet and nothing else."""

from __future__ import annotations

import fnmatch
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ds_pipelines.qwen_image import QwenImagePipeline
from ds_train import TrainingConfig, train
from ds_train.cache import load_cached_sample
from ds_train.qwen_image import TRAINING_MU, QwenImageTrainingAdapter
from tests.pipelines.qwen_image_fixtures import qwen_image_files  # noqa: F401  (session fixture)

SIZE = 32
BASE = dict(
    height=SIZE,
    width=SIZE,
    mixed_precision="no",
    device="cpu",
    seed=0,
    progress_bar=False,
    tensorboard=False,
    checkpoint_every=0,
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def pipe(qwen_image_files) -> QwenImagePipeline:  # noqa: F811
    return QwenImagePipeline.from_pretrained(
        qwen_image_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


def _shape(path, color, shape="square", size=SIZE):
    image = Image.new("RGB", (size, size), (128, 128, 128))
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (ImageDraw.Draw(image).rectangle if shape == "square" else ImageDraw.Draw(image).ellipse)(box, fill=color)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen-shapes")
    for name, color in (("red", (220, 30, 30)), ("blue", (40, 60, 220))):
        for shape in ("square", "circle"):
            _shape(folder / f"{name}_{shape}.png", color, shape)
            (folder / f"{name}_{shape}.txt").write_text(f"a {name} {shape}")
    return folder


def test_adapter_targets_blocks_sigmas_and_guards(pipe):
    adapter = QwenImageTrainingAdapter()
    assert adapter.default_timestep_sampling == "uniform" and adapter.default_loss_weighting == "bell"
    # DiffSynth-Studio's twelve LoRA targets in every block, each a Linear of the DiT.
    linears = [name for name, module in pipe.dit.named_modules() if isinstance(module, torch.nn.Linear)]
    targeted = {name for name in linears if any(fnmatch.fnmatch(name, p) for p in adapter.default_lora_targets)}
    blocks = len(pipe.dit.transformer_blocks)
    assert len(targeted) == 12 * blocks
    suffixes = {name.split(".", 2)[2] for name in targeted}
    assert suffixes == {
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_out.0",
        "attn.to_add_out",
        "img_mlp.net.2",
        "img_mod.1",
        "txt_mlp.net.2",
        "txt_mod.1",
    }
    assert adapter.blocks(pipe.dit) == list(pipe.dit.transformer_blocks)
    # Upstream's training sigmas: uniform, shift e^0.8, then 1 - sigma scaled so the 1000-grid's smallest is 0.02.
    drawn = adapter.sample_sigmas(pipe, torch.zeros(20000, 16, 4, 4), torch.Generator().manual_seed(0), "uniform")
    shift = math.exp(TRAINING_MU)

    def expected(u: float) -> float:
        shifted = shift * u / (1 + (shift - 1) * u)
        smallest = shift * 1e-3 / (1 + (shift - 1) * 1e-3)
        return 1 - (1 - shifted) * 0.98 / (1 - smallest)

    assert abs(float(drawn.median()) - expected(0.5)) < 0.01
    assert float(drawn.min()) >= 0.02 - 1e-6 and float(drawn.max()) <= 1 + 1e-6
    # Resolution does not change them (upstream trains at one mu); sigma_shift replaces the shift.
    big = adapter.sample_sigmas(pipe, torch.zeros(5, 16, 128, 128), torch.Generator().manual_seed(1), "uniform")
    small = adapter.sample_sigmas(pipe, torch.zeros(5, 16, 4, 4), torch.Generator().manual_seed(1), "uniform")
    torch.testing.assert_close(big, small)
    shifted = QwenImageTrainingAdapter(sigma_shift=1.0).sample_sigmas(
        pipe, torch.zeros(20000, 16, 4, 4), torch.Generator().manual_seed(0), "uniform"
    )
    assert abs(float(shifted.median()) - (1 - 0.5 * 0.98 / 0.999)) < 0.01
    with pytest.raises(ValueError, match="height=40 is not a multiple of 16"):
        adapter.check(pipe, 40, 32, None)
    with pytest.raises(ValueError, match="train_controlnet needs a ControlNet"):
        QwenImageTrainingAdapter(train_controlnet=True).check(pipe, 32, 32, None)
    with pytest.raises(ValueError, match=r"edit_image columns, which need Qwen2\.5-VL.s processor"):
        adapter.check_extras(pipe, {"edit_image"})
    with pytest.raises(ValueError, match="control_image columns, which feed a ControlNet"):
        adapter.check_extras(pipe, {"control_image"})
    # Prompts keep their length; the mask is always there, so a batch pads them.
    short, long = adapter.encode_prompts(pipe, ["a cat"]), adapter.encode_prompts(pipe, ["a red square on grey"])
    assert short["text_mask"].dtype == torch.bool and short["text_mask"].all()
    assert short["text"].shape[1] < long["text"].shape[1]


def test_a_lora_step_changes_the_output(qwen_image_files, pipe, shapes, tmp_path):  # noqa: F811
    run = TrainingConfig(
        **BASE,
        model=qwen_image_files.repo,
        data=shapes,
        output=tmp_path / "lora",
        steps=3,
        learning_rate=5e-2,
        lora_rank=4,
        lora_alpha=4.0,
        batch_size=2,
        cache=True,
    )
    result = train(run, adapter=QwenImageTrainingAdapter())
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    with safe_open(result.weights_path, "pt") as file:
        keys = set(file.keys())
    assert any("transformer_blocks.1.attn.add_k_proj" in key for key in keys)
    assert any("transformer_blocks.0.img_mod.1" in key for key in keys)
    noise = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    options = dict(height=SIZE, width=SIZE, num_inference_steps=2, cfg_scale=1.0)
    fresh = QwenImagePipeline.from_pretrained(
        qwen_image_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )
    before = np.asarray(fresh("a red square", noise=noise, **options)).astype(np.int16)
    fresh.load_lora(result.weights_path)
    after = np.asarray(fresh("a red square", noise=noise, **options)).astype(np.int16)
    assert np.abs(after - before).mean() > 1, "the trained LoRA changes nothing"


@pytest.fixture(scope="module")
def edit_data(tmp_path_factory):
    """Targets (a shape recoloured) with their edit images (the shape in grey, another size) and instructions."""
    folder = tmp_path_factory.mktemp("qwen-edit")
    rows = []
    for index, (name, color) in enumerate((("red", (220, 30, 30)), ("blue", (40, 60, 220)))):
        _shape(folder / f"target{index}.png", color)
        _shape(folder / f"source{index}.png", (90, 90, 90), size=48)
        rows.append({"image": f"target{index}.png", "edit_image": f"source{index}.png", "prompt": f"paint it {name}"})
    rows[1]["edit_image"] = ["source1.png", "source0.png"]  # two edit images
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


def test_edit_samples_are_encoded_as_the_edit_pipeline_encodes_them(qwen_image_files, edit_data, tmp_path):  # noqa: F811
    adapter = QwenImageTrainingAdapter(edit_image_area=32 * 32)
    run = TrainingConfig(
        **BASE,
        model=qwen_image_files.edit_repo,
        data=edit_data,
        output=tmp_path / "edit",
        steps=2,
        learning_rate=1e-2,
        lora_rank=2,
        cache=True,
        caption_dropout=0.5,
    )
    result = train(run, adapter=adapter)
    assert all(np.isfinite(result.losses))
    conditions, latents, empty = load_cached_sample(tmp_path / "edit" / "cache" / "000001.safetensors")
    assert latents.shape == (16, SIZE // 8, SIZE // 8)
    # Two edit images: two reference latents at the edit area (32x32 pixels), in order.
    assert sorted(k for k in conditions if k.startswith("reference")) == ["reference_latents.0", "reference_latents.1"]
    assert conditions["reference_latents.0"].shape == (16, 4, 4)
    # The same numbers the edit pipeline computes at sampling: its VL images with the instruction, its VAE latents.
    pipe = adapter.pipe
    images = []
    for name in ("source1.png", "source0.png"):
        with Image.open(edit_data / name) as image:
            images.append(image.convert("RGB"))
    vl_images, _ = pipe.prepare_edit_images(images)
    embedding = pipe.encode_edit_prompt("paint it blue", vl_images)
    torch.testing.assert_close(conditions["text"], embedding.text[0], rtol=1e-4, atol=1e-4)
    reference = pipe.encode_image(images[0].resize((32, 32), Image.Resampling.LANCZOS))
    torch.testing.assert_close(conditions["reference_latents.0"], reference[0], rtol=1e-4, atol=1e-4)
    # Caption dropout's empty prompt for this sample is the empty instruction seen with the same edit images.
    empty_embedding = pipe.encode_edit_prompt("", vl_images)
    assert empty is not None
    torch.testing.assert_close(empty["text"], empty_embedding.text[0], rtol=1e-4, atol=1e-4)
    # The DiT sees the references after the target's tokens: a different edit image changes the prediction.
    noisy, sigmas = torch.randn(1, 16, 4, 4), torch.tensor([0.7])
    batch = {k: v[None] for k, v in conditions.items()}
    with torch.no_grad():
        first = adapter.predict(pipe.dit, noisy, sigmas, batch)
        other = adapter.predict(
            pipe.dit, noisy, sigmas, batch | {"reference_latents.0": -batch["reference_latents.0"]}
        )
    assert first.shape == noisy.shape and (first - other).abs().mean() > 1e-3


@pytest.fixture(scope="module")
def control_data(tmp_path_factory):
    """Targets with a control map (the shape's outline) per row, as metadata.csv."""
    folder = tmp_path_factory.mktemp("qwen-control")
    lines = ["image,control_image,prompt"]
    for name, color in (("red", (220, 30, 30)), ("blue", (40, 60, 220))):
        _shape(folder / f"{name}.png", color)
        outline = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
        ImageDraw.Draw(outline).rectangle((8, 8, 24, 24), outline=(255, 255, 255))
        outline.save(folder / f"{name}_edges.png")
        lines.append(f"{name}.png,{name}_edges.png,a {name} square")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def blockwise_file(tmp_path_factory):
    from ds_models_qwen_image.controlnet import QwenImageBlockwiseControlNet, QwenImageBlockwiseControlNetConfig

    torch.manual_seed(5)
    controlnet = QwenImageBlockwiseControlNet(QwenImageBlockwiseControlNetConfig.tiny())
    with torch.no_grad():  # random, not zero-initialised: its residuals reach the output from the first step
        for parameter in controlnet.parameters():
            parameter.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("qwen-controlnet") / "model.safetensors"
    save_file(controlnet.state_dict(), str(path))
    return path


def test_controlnet_training_changes_only_the_controlnet(
    qwen_image_files,  # noqa: F811
    control_data,
    blockwise_file,
    tmp_path,
):
    adapter = QwenImageTrainingAdapter(controlnet=str(blockwise_file), train_controlnet=True)
    run = TrainingConfig(
        **BASE,
        model=qwen_image_files.repo,
        data=control_data,
        output=tmp_path / "controlnet",
        mode="full",
        trainable=("controlnet",),
        steps=2,
        learning_rate=1e-2,
        cache=True,
        gradient_checkpointing=True,
    )
    result = train(run, adapter=adapter)
    assert all(np.isfinite(result.losses))
    assert result.weights_path.name == "controlnet.safetensors"
    before, after = load_file(str(blockwise_file)), load_file(str(result.weights_path))
    assert set(before) == set(after)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert "img_in.weight" in changed and any(key.startswith("controlnet_blocks.1.") for key in changed)
    # The DiT the run used is the released one, untouched.
    original = load_file(str(next((qwen_image_files.repo / "transformer").glob("*.safetensors"))))
    dit = adapter.pipe.dit.state_dict()
    assert all(torch.equal(dit[key].float(), value.float()) for key, value in original.items())
    # The cache holds the control tokens the pipeline encodes for a ControlNetInput of the same map.
    from ds_pipelines import ControlNetInput

    conditions, _, _ = load_cached_sample(tmp_path / "controlnet" / "cache" / "000000.safetensors")
    with Image.open(control_data / "red_edges.png") as edges:
        expected = adapter.pipe.encode_control(ControlNetInput(edges.convert("RGB")), SIZE, SIZE)
    torch.testing.assert_close(conditions["control"], expected[0], rtol=1e-4, atol=1e-4)


def test_random_inputs_run_through_the_prediction_step():
    from ds_models_qwen_image.dit import QwenImageDiT, QwenImageDiTConfig
    from ds_train import get_adapter

    model = QwenImageDiT(QwenImageDiTConfig.tiny()).eval()
    adapter = get_adapter("qwen-image")
    assert isinstance(adapter, QwenImageTrainingAdapter)
    latents, given = adapter.random_inputs(model, 2, (4, 6), None, 5, torch.Generator().manual_seed(0))
    assert latents.shape == (2, 16, 4, 6) and set(given) == {"text", "text_mask"} and given["text"].shape[1] == 5
    with torch.no_grad():
        velocity = adapter.predict(model, latents, torch.tensor([0.3, 0.8]), given)
    assert velocity.shape == latents.shape and torch.isfinite(velocity).all()
