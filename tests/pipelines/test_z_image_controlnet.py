"""ZImagePipeline with the Fun ControlNet Union against diffusers' ZImageControlNetPipeline on the same tiny
components and noise, the control context as VideoX-Fun builds it, the step window, and the guards.

Two deliberate differences from diffusers 0.42, both as VideoX-Fun's official pipeline (and DiffSynth-Studio) run the
2.x models: the refiner hints also go into the DiT's noise refiner, and without an inpaint mask the 17 extra input
channels are a zero mask channel and the latents of an all-zero (mid-gray) picture, not zero latents. The 2.1 test
applies both to diffusers' pipeline through hooks and then expects the same image.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import ZImageControlNetModel, ZImageControlNetPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

from ds_pipelines import ControlNetInput
from ds_pipelines.z_image import ZImagePipeline
from tests.pipelines.z_image_fixtures import DIT_KWARGS, randomize_dit, z_image_files  # noqa: F401

SIZE = 64  # pixels: 8x8 latents
PROMPT = "the cat and the hat"
VERSIONS = {"2.1": ("control_noise_refiner", 33), "1.0": (None, 16)}
FILES = {
    "2.1": "Z-Image-Turbo-Fun-Controlnet-Union-2.1-8steps.safetensors",
    "1.0": "Z-Image-Turbo-Fun-Controlnet-Union.safetensors",
}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


def _diffusers_controlnet(version: str) -> ZImageControlNetModel:
    refiner, channels = VERSIONS[version]
    return ZImageControlNetModel(
        control_layers_places=[0, 1],
        control_refiner_layers_places=[0, 1],
        control_in_dim=channels,
        add_control_noise_refiner=refiner,
        dim=DIT_KWARGS["dim"],
        n_refiner_layers=DIT_KWARGS["n_refiner_layers"],
        n_heads=DIT_KWARGS["n_heads"],
        n_kv_heads=DIT_KWARGS["n_kv_heads"],
    )


@pytest.fixture(scope="module")
def controlnet_files(z_image_files, tmp_path_factory) -> dict[str, object]:  # noqa: F811
    folder = tmp_path_factory.mktemp("z_image_controlnet")
    paths = {}
    for seed, version in enumerate(VERSIONS):
        model = randomize_dit(_diffusers_controlnet(version), 70 + seed)
        paths[version] = folder / FILES[version]
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths[version])
    return paths


@pytest.fixture(scope="module")
def pipes(z_image_files, controlnet_files) -> dict[str, ZImagePipeline]:  # noqa: F811
    return {
        version: ZImagePipeline.from_pretrained(
            z_image_files.repo,
            model_configs=[path],  # named "controlnet" by detection
            torch_dtype=torch.float32,
            device="cpu",
            progress_bar=False,
        )
        for version, path in controlnet_files.items()
    }


def diffusers_controlnet_pipeline(ns: SimpleNamespace, path) -> ZImageControlNetPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    version = "1.0" if "Union.safetensors" in path.name else "2.1"
    controlnet = _diffusers_controlnet(version)
    controlnet.load_state_dict(load_file(path))
    pipe = ZImageControlNetPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(ns.repo / "scheduler"),
        vae=ns.vae,
        text_encoder=ns.text_encoder,
        tokenizer=AutoTokenizer.from_pretrained(ns.repo / "tokenizer"),
        transformer=ns.transformer,
        controlnet=ZImageControlNetModel.from_transformer(controlnet.eval(), ns.transformer),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def follow_videox_fun(pipe: ZImageControlNetPipeline) -> list:
    """Make diffusers' pipeline run the 2.x ControlNet as VideoX-Fun does: the extra channels are a zero mask and the
    latents of a zero picture, and the refiner hints go into the transformer's noise refiner. Returns the hook
    handles."""
    controlnet, transformer, vae = pipe.controlnet, pipe.transformer, pipe.vae
    state = {"inside": False, "hints": []}
    with torch.no_grad():
        gray = vae.encode(torch.zeros(1, 3, SIZE, SIZE)).latent_dist.mode()
    gray = (gray - vae.config.shift_factor) * vae.config.scaling_factor
    extra = torch.cat([torch.zeros(1, 1, *gray.shape[-2:]), gray], dim=1)[0].unsqueeze(1)  # (17, 1, h, w)
    original = controlnet.forward

    def forward(x, t, cap_feats, control_context, conditioning_scale=1.0, **kwargs):
        control_context = [torch.cat([c[:16], extra.to(c)], dim=0) for c in control_context]
        state["inside"], state["scale"] = True, conditioning_scale
        try:
            return original(x, t, cap_feats, control_context, conditioning_scale=conditioning_scale, **kwargs)
        finally:
            state["inside"] = False

    def keep(module, args, output):  # the control refiner's stacked output: [hint 0, hint 1, c]
        state["hints"] = [hint * state["scale"] for hint in output.unbind(0)[:-1]]

    def add(index):
        def hook(module, args, output):
            return output if state["inside"] else output + state["hints"][index]

        return hook

    controlnet.forward = forward
    handles = [controlnet.control_noise_refiner[-1].register_forward_hook(keep)]
    handles += [block.register_forward_hook(add(i)) for i, block in enumerate(transformer.noise_refiner)]
    return handles


def control_image(seed: int = 3) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(array)


def noise_for(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def reference(pipe: ZImageControlNetPipeline, noise: torch.Tensor, image: Image.Image, **kwargs) -> np.ndarray:
    with torch.no_grad():
        images = pipe(
            PROMPT,
            height=SIZE,
            width=SIZE,
            num_inference_steps=8,
            control_image=image,
            latents=noise.clone(),
            output_type="pt",
            **kwargs,
        ).images
    return (images[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()


def ours(pipe: ZImagePipeline, noise: torch.Tensor, controls, **kwargs) -> np.ndarray:
    options = dict(height=SIZE, width=SIZE, num_inference_steps=8, noise=noise.clone())
    return pixels(pipe(PROMPT, controlnet_inputs=controls, **(options | kwargs)))


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0], ids=["cfg-off", "cfg-on"])
def test_union_1_0_matches_diffusers(z_image_files, controlnet_files, pipes, cfg_scale):  # noqa: F811
    theirs = diffusers_controlnet_pipeline(z_image_files, controlnet_files["1.0"])
    noise, image = noise_for(1), control_image()
    expected = reference(theirs, noise, image, guidance_scale=cfg_scale - 1, controlnet_conditioning_scale=0.8)
    got = ours(pipes["1.0"], noise, ControlNetInput(image, scale=0.8, control_type="canny"), cfg_scale=cfg_scale)
    assert np.abs(got - expected).max() <= 1
    plain = ours(pipes["1.0"], noise, None, cfg_scale=cfg_scale)
    assert np.abs(plain - expected).mean() > 2  # the ControlNet changes the image


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0], ids=["cfg-off", "cfg-on"])
def test_union_2_1_matches_videox_fun(z_image_files, controlnet_files, pipes, cfg_scale):  # noqa: F811
    theirs = diffusers_controlnet_pipeline(z_image_files, controlnet_files["2.1"])
    noise, image = noise_for(2), control_image()
    stock = reference(theirs, noise, image, guidance_scale=cfg_scale - 1, controlnet_conditioning_scale=0.9)
    handles = follow_videox_fun(theirs)
    try:
        expected = reference(theirs, noise, image, guidance_scale=cfg_scale - 1, controlnet_conditioning_scale=0.9)
    finally:
        for handle in handles:
            handle.remove()
    got = ours(pipes["2.1"], noise, [ControlNetInput(image, scale=0.9)], cfg_scale=cfg_scale)
    assert np.abs(got - expected).max() <= 1
    assert np.abs(got - stock).max() > 1  # what diffusers 0.42 does differs


# ---------------------------------------------------------------------------------------------- the control input
def test_control_context_with_an_inpaint_mask(pipes):
    pipe = pipes["2.1"]
    picture, pose = control_image(5), control_image(6)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # repaint the left half
    control = ControlNetInput(pose, inpaint_mask=mask, inpaint_image=picture, control_type="pose")
    context = pipe.encode_control(control, SIZE, SIZE)
    assert context.shape == (1, 33, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(context[:, :16], pipe.encode_image(pose))
    keep = context[0, 16]
    assert keep[:, : SIZE // 16].eq(0).all() and keep[:, SIZE // 16 :].eq(1).all()
    masked = control.repaint_tensor(SIZE, SIZE)
    masked[..., : SIZE // 2] = 0
    torch.testing.assert_close(context[:, 17:], pipe.encode_image(masked))
    inpaint = ControlNetInput(picture, inpaint_mask=mask, control_type="inpaint")
    only = pipe.encode_control(inpaint, SIZE, SIZE)
    assert only[:, :16].eq(0).all()
    torch.testing.assert_close(only[:, 16:], context[:, 16:])


def test_window_scale_and_sum(pipes):
    pipe = pipes["2.1"]
    noise, image = noise_for(4), control_image()
    calls = []
    handle = pipe.controlnet.register_forward_hook(lambda m, a, out: calls.append(1))
    try:
        early = ours(pipe, noise, ControlNetInput(image, end=0.5))
    finally:
        handle.remove()
    assert len(calls) == 4  # steps 0-3 of 8
    whole = ours(pipe, noise, ControlNetInput(image))
    plain = ours(pipe, noise, None)
    assert np.abs(early - whole).mean() > 1 and np.abs(early - plain).mean() > 1
    assert np.array_equal(ours(pipe, noise, ControlNetInput(image, scale=0.0)), plain)
    twice = ours(pipe, noise, [ControlNetInput(image, scale=0.5), ControlNetInput(image, scale=0.5)])
    assert np.abs(twice - whole).max() > 0  # two inputs' hints add; not the same as one at scale 1 (2.x)


def test_guards(z_image_files, pipes):  # noqa: F811
    plain = ZImagePipeline.from_pretrained(z_image_files.repo, torch_dtype=torch.float32, device="cpu")
    image = control_image()
    with pytest.raises(ValueError, match="needs controlnet"):
        plain(PROMPT, height=SIZE, width=SIZE, controlnet_inputs=ControlNetInput(image))
    with pytest.raises(ValueError, match="inpaint_mask: this ControlNet takes 16 channels"):
        pipes["1.0"](PROMPT, height=SIZE, width=SIZE, controlnet_inputs=ControlNetInput(image, inpaint_mask=image))
    with pytest.raises(ValueError, match="controlnet_id=1"):
        pipes["2.1"](PROMPT, height=SIZE, width=SIZE, controlnet_inputs=ControlNetInput(image, controlnet_id=1))
    with pytest.raises(TypeError, match="controlnet_inputs must be a ControlNetInput"):
        pipes["2.1"](PROMPT, height=SIZE, width=SIZE, controlnet_inputs="canny.png")
    result = pipes["2.1"](
        PROMPT,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        controlnet_inputs=[ControlNetInput(image, scale=0.7, end=0.5, control_type="canny")],
    )
    assert '"controlnet": [{"type": "canny", "scale": 0.7, "start": 0.0, "end": 0.5}]' in result.info["diffsynth"]


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_control_image(z_image_files, controlnet_files, capsys, tmp_path):  # noqa: F811
    from tests.apps.test_cli import run_main

    image_path = tmp_path / "pose.png"
    control_image().save(image_path)
    common = ["generate", "--model", z_image_files.repo, "--prompt", "the cat", "--height", SIZE, "--width", SIZE]
    common += ["--steps", 2, "--device", "cpu", "--quiet"]
    output = tmp_path / "controlled.png"
    code, _, err = run_main(
        capsys,
        *common,
        "-o",
        output,
        "--controlnet",
        controlnet_files["2.1"],
        "--control-image",
        image_path,
        "--control-type",
        "Pose",
        "--control-scale",
        0.75,
    )
    assert code == 0, err
    with Image.open(output) as image:
        recorded = json.loads(image.info["diffsynth"])
    assert recorded["controlnet"] == [{"type": "pose", "scale": 0.75, "start": 0.0, "end": 1.0}]

    code, _, err = run_main(capsys, *common, "-o", tmp_path / "a.png", "--control-type", "canny")
    assert code == 2 and "--control-type and --control-scale need --control-image" in err
    code, _, err = run_main(capsys, *common, "--control-image", image_path, "--control-scale", "nan")
    assert code == 2 and "argument --control-scale: nan is not a finite number" in err
    code, _, err = run_main(capsys, *common, "-o", tmp_path / "b.png", "--control-image", image_path)
    assert code == 1 and "needs controlnet" in err
    code, _, err = run_main(capsys, *common, "--controlnet", tmp_path / "missing.safetensors")
    assert code == 1 and "--controlnet" in err and "no such file" in err
    code, _, err = run_main(
        capsys, "generate", "--prompt", "x", "--controlnet", controlnet_files["2.1"], "-o", tmp_path / "c.png"
    )
    assert code == 2 and "takes no ControlNet" in err
