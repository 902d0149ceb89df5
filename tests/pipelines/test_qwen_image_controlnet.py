"""QwenImagePipeline with ControlNets: the InstantX Union against diffusers' QwenImageControlNetPipeline on the same
tiny components and noise, the blockwise ControlNet against diffusers' QwenImagePipeline with DiffSynth-Studio's
blockwise residual written here by hand as forward hooks, the inpainting conditioning, the step window, the guards.

One deliberate difference from diffusers 0.42: it samples the control image's VAE posterior (``latent_dist.sample``,
a fresh draw each call); we take its mean, as DiffSynth-Studio and diffusers' edit pipelines do. The parity test makes
diffusers take the mean too.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImageControlNetModel
from safetensors.torch import load_file, save_file

from ds_models_qwen_image.controlnet import QwenImageBlockwiseControlNet, QwenImageBlockwiseControlNetConfig
from ds_pipelines import ControlNetInput
from ds_pipelines.qwen_image import QwenImagePipeline, pack_latents
from tests.pipelines.qwen_image_fixtures import (  # noqa: F401  (session fixture)
    DIT_KWARGS,
    diffusers_pipeline,
    qwen_image_files,
    randomize,
    scheduler,
    tokenizer,
)

SIZE = 64
PROMPT = "the cat and the hat"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models compute on one thread (see tests/conftest.py)."""


def union_kwargs(extra: int = 0) -> dict:
    keep = ("patch_size", "in_channels", "out_channels", "attention_head_dim", "num_attention_heads")
    kwargs = {key: DIT_KWARGS[key] for key in keep}
    return kwargs | dict(
        num_layers=1,  # one sample spread over the DiT's two blocks (diffusers' interval rule)
        joint_attention_dim=DIT_KWARGS["joint_attention_dim"],
        axes_dims_rope=DIT_KWARGS["axes_dims_rope"],
        extra_condition_channels=extra,
    )


def blockwise(seed: int, inpaint: bool = False) -> QwenImageBlockwiseControlNet:
    config = QwenImageBlockwiseControlNetConfig.preset("tiny-inpaint" if inpaint else "tiny")
    return randomize(QwenImageBlockwiseControlNet(config), seed)


@pytest.fixture(scope="module")
def controlnet_files(qwen_image_files, tmp_path_factory) -> dict[str, object]:  # noqa: F811
    folder = tmp_path_factory.mktemp("qwen_image_controlnet")
    union = randomize(QwenImageControlNetModel(**union_kwargs()), 80)
    union.save_pretrained(folder / "InstantX-Union")  # config.json + diffusion_pytorch_model.safetensors
    paths = {"union": folder / "InstantX-Union", "union_model": union}
    for name, seed, inpaint in (("canny", 81, False), ("inpaint", 82, True)):
        model = blockwise(seed, inpaint)
        paths[name] = folder / f"Qwen-Image-Blockwise-ControlNet-{name}" / "model.safetensors"
        paths[name].parent.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths[name])
    return paths


@pytest.fixture(scope="module")
def pipes(qwen_image_files, controlnet_files) -> dict[str, QwenImagePipeline]:  # noqa: F811
    return {
        name: QwenImagePipeline.from_pretrained(
            qwen_image_files.repo,
            model_configs=[controlnet_files[name]],  # named "controlnet" by detection
            torch_dtype=torch.float32,
            device="cpu",
            progress_bar=False,
        )
        for name in ("union", "canny", "inpaint")
    }


def control_image(seed: int = 3):
    from PIL import Image

    array = np.random.default_rng(seed).integers(0, 256, (SIZE // 4, SIZE // 4, 3), dtype=np.uint8)
    return Image.fromarray(array).resize((SIZE, SIZE), Image.Resampling.NEAREST)


def noise_for(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def as_pixels(images: torch.Tensor) -> np.ndarray:
    return (images[0].permute(1, 2, 0) * 255).round().to(torch.int16).numpy()


def ours(pipe: QwenImagePipeline, noise: torch.Tensor, controls, **kwargs) -> np.ndarray:
    options = dict(height=SIZE, width=SIZE, num_inference_steps=4, noise=noise.clone(), negative_prompt="blurry")
    return pixels(pipe(PROMPT, controlnet_inputs=controls, **(options | kwargs)))


# ---------------------------------------------------------------------------------------------- InstantX Union
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0], ids=["cfg-off", "cfg-on"])
def test_union_matches_diffusers(qwen_image_files, controlnet_files, pipes, monkeypatch, cfg_scale):  # noqa: F811
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_controlnet as module
    from diffusers import QwenImageControlNetPipeline

    original = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents", lambda output, generator=None: original(output, None, "argmax"))
    theirs = QwenImageControlNetPipeline(
        scheduler=scheduler(qwen_image_files),
        vae=qwen_image_files.vae,
        text_encoder=qwen_image_files.text_encoder,
        tokenizer=tokenizer(qwen_image_files),
        transformer=qwen_image_files.transformer,
        controlnet=controlnet_files["union_model"],
    )
    theirs.set_progress_bar_config(disable=True)
    noise, image = noise_for(1), control_image()
    with torch.no_grad():
        expected = theirs(
            PROMPT,
            negative_prompt="blurry",
            true_cfg_scale=cfg_scale,
            control_image=image,
            controlnet_conditioning_scale=0.8,
            height=SIZE,
            width=SIZE,
            num_inference_steps=4,
            latents=pack_latents(noise.clone()),
            output_type="pt",
        ).images
    expected = as_pixels(expected)
    got = ours(pipes["union"], noise, ControlNetInput(image, scale=0.8), cfg_scale=cfg_scale)
    assert np.abs(got - expected).max() <= 1, np.abs(got - expected).max()
    plain = ours(pipes["union"], noise, None, cfg_scale=cfg_scale)
    assert np.abs(plain - expected).mean() > 1  # the ControlNet changes the image


# ---------------------------------------------------------------------------------------------- blockwise
def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def blockwise_hooks(transformer, state: dict[str, torch.Tensor], tokens: torch.Tensor, scale: float, window) -> list:
    """DiffSynth-Studio's blockwise ControlNet on diffusers' transformer: after block i, the target's image tokens x
    get ``output_proj(gelu(input_proj(x_rms(x) + y_rms(img_in(c))))) * scale`` while step i is in ``window``."""
    control = F.linear(tokens, state["img_in.weight"], state["img_in.bias"])
    step = {"index": -1}

    def count(module, args, kwargs):
        step["index"] += 1

    def hook(index: int):
        def add(module, args, output):
            if not window(step["index"]):
                return output
            text, image = output
            p = f"controlnet_blocks.{index}."
            x = image[:, : control.shape[1]]
            hidden = rms(x, state[p + "x_rms.weight"]) + rms(control, state[p + "y_rms.weight"])
            hidden = F.gelu(F.linear(hidden, state[p + "input_proj.weight"], state[p + "input_proj.bias"]))
            residual = F.linear(hidden, state[p + "output_proj.weight"], state[p + "output_proj.bias"]) * scale
            return text, torch.cat([x + residual, image[:, control.shape[1] :]], dim=1)

        return add

    handles = [transformer.register_forward_pre_hook(count, with_kwargs=True)]
    handles += [block.register_forward_hook(hook(i)) for i, block in enumerate(transformer.transformer_blocks)]
    return handles, step


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0], ids=["cfg-off", "cfg-on"])
def test_blockwise_matches_diffsynth_residuals_on_diffusers(qwen_image_files, controlnet_files, pipes, cfg_scale):  # noqa: F811
    noise, image = noise_for(2), control_image(4)
    control = ControlNetInput(image, scale=0.7, start=0.25, end=1.0)  # steps 1-3 of 4
    got = ours(pipes["canny"], noise, control, cfg_scale=cfg_scale)

    vae = qwen_image_files.vae
    with torch.no_grad():
        mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
        pixels_in = control.image_tensor(SIZE, SIZE).unsqueeze(2)
        latents = ((vae.encode(pixels_in).latent_dist.mode() - mean) / std)[:, :, 0]
    state = load_file(controlnet_files["canny"])
    theirs = diffusers_pipeline(qwen_image_files)
    calls_per_step = 2 if cfg_scale > 1 else 1
    handles, step = blockwise_hooks(
        theirs.transformer, state, pack_latents(latents), 0.7, lambda call: call // calls_per_step >= 1
    )
    try:
        with torch.no_grad():
            expected = theirs(
                PROMPT,
                negative_prompt="blurry",
                true_cfg_scale=cfg_scale,
                height=SIZE,
                width=SIZE,
                num_inference_steps=4,
                latents=pack_latents(noise.clone()),
                output_type="pt",
            ).images
    finally:
        for handle in handles:
            handle.remove()
    assert step["index"] + 1 == 4 * calls_per_step
    expected = as_pixels(expected)
    assert np.abs(got - expected).max() <= 1, np.abs(got - expected).max()
    plain = ours(pipes["canny"], noise, None, cfg_scale=cfg_scale)
    assert np.abs(plain - expected).mean() > 1


def test_inpaint_conditioning_is_the_blacked_picture_and_the_kept_mask(pipes):
    from PIL import Image

    pipe = pipes["inpaint"]
    picture = control_image(5)
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (0, 0, SIZE // 2, SIZE))  # repaint the left half
    conditioning = pipe.encode_control(ControlNetInput(picture, inpaint_mask=mask), SIZE, SIZE)
    assert conditioning.shape == (1, (SIZE // 16) ** 2, 68)
    blacked = np.asarray(picture).copy()
    blacked[:, : SIZE // 2] = 0
    latents = pipe.encode_image(Image.fromarray(blacked))
    keep = torch.ones(1, 1, SIZE // 8, SIZE // 8)
    keep[..., : SIZE // 16] = 0
    torch.testing.assert_close(conditioning, pack_latents(torch.cat([latents, keep], dim=1)))
    # it runs and the mask matters
    noise = noise_for(3)
    with_mask = ours(pipe, noise, ControlNetInput(picture, inpaint_mask=mask), cfg_scale=1.0)
    other = Image.new("L", (SIZE, SIZE), 0)
    other.paste(255, (SIZE // 2, 0, SIZE, SIZE))
    assert (
        np.abs(ours(pipe, noise, ControlNetInput(picture, inpaint_mask=other), cfg_scale=1.0) - with_mask).mean() > 1
    )


# ---------------------------------------------------------------------------------------------- window and guards
def test_scale_zero_and_an_empty_window_leave_the_image_alone(pipes):
    noise, image = noise_for(6), control_image(6)
    plain = ours(pipes["canny"], noise, None, cfg_scale=1.0)
    assert np.array_equal(ours(pipes["canny"], noise, ControlNetInput(image, scale=0.0), cfg_scale=1.0), plain)
    late = ours(pipes["canny"], noise, ControlNetInput(image, start=0.0, end=0.2), cfg_scale=1.0)  # no whole step
    assert np.array_equal(late, plain)
    image_out = pipes["canny"](
        PROMPT, controlnet_inputs=ControlNetInput(image, scale=0.5), height=SIZE, width=SIZE, num_inference_steps=1
    )
    assert json.loads(image_out.info["diffsynth"])["controlnet"] == [
        {"type": None, "scale": 0.5, "start": 0.0, "end": 1.0}
    ]


def test_controlnet_guards(qwen_image_files, pipes):  # noqa: F811
    from PIL import Image

    options = dict(height=SIZE, width=SIZE, num_inference_steps=1, seed=0)
    mask = Image.new("L", (SIZE, SIZE), 255)
    with pytest.raises(ValueError, match=r"reads 17 latent channels .*give the ControlNetInput an inpaint_mask"):
        pipes["inpaint"](PROMPT, controlnet_inputs=ControlNetInput(control_image()), **options)
    with pytest.raises(ValueError, match="inpaint_mask: the loaded ControlNet has no mask input"):
        pipes["canny"](PROMPT, controlnet_inputs=ControlNetInput(control_image(), inpaint_mask=mask), **options)
    with pytest.raises(ValueError, match="controlnet_id=1: QwenImagePipeline has one ControlNet"):
        pipes["canny"](PROMPT, controlnet_inputs=ControlNetInput(control_image(), controlnet_id=1), **options)
    plain = QwenImagePipeline.from_pretrained(
        qwen_image_files.repo, torch_dtype=torch.float32, device="cpu", progress_bar=False
    )
    with pytest.raises(ValueError, match="needs controlnet"):
        plain(PROMPT, controlnet_inputs=ControlNetInput(control_image()), **options)
    with pytest.raises(TypeError, match="controlnet_inputs must be a ControlNetInput"):
        plain(PROMPT, controlnet_inputs="canny.png", **options)
