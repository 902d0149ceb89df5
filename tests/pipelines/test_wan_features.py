"""WanVideoPipeline's options around sampling: video-to-video, seeds, guards, LoRA on either expert, the layouts
from_pretrained reads, ds-vram management, and the mp4 of a generated video."""

from __future__ import annotations

import json
import shutil

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ds_pipelines import FlowMatchScheduler, WanVideoPipeline, load_video, save_video, shift_sigmas
from ds_vram import VRAMConfig
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401  (the session fixture)

SIZE, FRAMES = 32, 5
KW = dict(height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=2)


def load(folder, **kwargs) -> WanVideoPipeline:
    kwargs = {"torch_dtype": torch.float32, **kwargs}
    return WanVideoPipeline.from_pretrained(folder, device="cpu", progress_bar=False, **kwargs)


@pytest.fixture(scope="module")
def t2v(wan_files) -> WanVideoPipeline:  # noqa: F811
    return load(wan_files.t2v)


def noise_for(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(seed))


def pixels(frames) -> np.ndarray:
    return np.stack([np.asarray(frame) for frame in frames]).astype(np.int16)


def a_video(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (SIZE, SIZE, 3))
    return [Image.fromarray(np.roll(base, shift, axis=1).astype(np.uint8)) for shift in range(FRAMES)]


def test_seed_is_cpu_float32_noise_and_cfg_one_is_one_pass(t2v):
    first = t2v("the cat", seed=3, negative_prompt="blurry", **KW)
    again = t2v("the cat", noise=noise_for(3), negative_prompt="blurry", **KW)  # CPU float32 randn, seed 3
    assert np.array_equal(pixels(first), pixels(again))
    calls = []
    original = t2v.dit.forward
    t2v.dit.forward = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    try:
        unguided = t2v("the cat", seed=3, cfg_scale=1.0, **KW)
        assert len(calls) == 2  # one DiT pass per step without guidance, two with it
        calls.clear()
        t2v("the cat", seed=3, **KW)
        assert len(calls) == 4
    finally:
        del t2v.dit.forward
    assert np.abs(pixels(unguided) - pixels(first)).mean() > 0.5  # guidance moves a tiny random model a little
    assert first.parameters["seed"] == 3 and first.parameters["cfg_scale"] == 5.0 and first.fps == 16


def test_video_to_video_strength(t2v):
    video = a_video()
    barely = t2v("the cat", input_video=video, denoising_strength=0.001, seed=1, **KW)
    halfway = t2v("the cat", input_video=video, denoising_strength=0.6, seed=1, **KW)
    text_only = t2v("the cat", seed=1, **KW)
    from ds_pipelines import image_to_tensor, tensor_to_images

    source = torch.stack([image_to_tensor(frame) for frame in video], dim=2)
    round_trip = pixels(tensor_to_images(t2v.decode(t2v.encode_video(source))[0].transpose(0, 1)))
    near = np.abs(pixels(barely) - round_trip).mean()
    far = np.abs(pixels(halfway) - pixels(barely)).mean()
    assert near < 2 and far > 3 * near, (near, far)
    assert np.abs(pixels(halfway) - pixels(text_only)).mean() > 2
    # The grid starts at 0.999 * strength before the shift, as the official grid scaled down.
    scheduler = FlowMatchScheduler("wan")
    scheduler.set_timesteps(2, denoising_strength=0.6, sigma_shift=5.0)
    assert float(scheduler.sigmas[0]) == pytest.approx(float(shift_sigmas(torch.tensor(0.999 * 0.6), 5.0)))
    assert halfway.parameters["denoising_strength"] == 0.6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_frames=8), "num_frames=8 is not of the form 4k\\+1 .* nearest valid counts are 5 and 9"),
        (dict(height=40), "height=40 is not a multiple of 16 .* nearest valid sizes are 32 and 48"),
        (dict(denoising_strength=0.5), "denoising_strength != 1 needs an input_video"),
        (dict(noise=torch.zeros(1, 16, 2, 2, 2)), "noise has shape \\(1, 16, 2, 2, 2\\); 5 frames of 32x32 need"),
        (dict(sampler="ddim"), "sampler='ddim' is not supported; use 'euler' or 'unipc'"),
        (dict(input_image=Image.new("RGB", (SIZE, SIZE))), "input_image needs an image-to-video model"),
        (dict(end_image=Image.new("RGB", (SIZE, SIZE))), "end_image needs a model conditioned on frames"),
        (dict(boundary=1.5), "boundary=1.5 must be in \\[0, 1\\]"),
        (dict(input_video=a_video()[:3]), "input_video has 3 frames; num_frames=5 needs at least that many"),
    ],
)
def test_guards(t2v, kwargs, message):
    with pytest.raises(ValueError, match=message):
        t2v("the cat", **{**KW, "seed": 0, **kwargs})


def test_image_models_need_their_image(wan_files):  # noqa: F811
    i2v = load(wan_files.i2v)
    with pytest.raises(ValueError, match=r"this image-to-video DiT .* needs input_image"):
        i2v("the cat", seed=0, **KW)
    missing = WanVideoPipeline({**i2v._components, "image_encoder": None}, device="cpu", torch_dtype=torch.float32)
    with pytest.raises(ValueError, match="needs image_encoder for this call"):
        missing("the cat", seed=0, input_image=Image.new("RGB", (SIZE, SIZE)), **KW)
    flf2v = load(wan_files.flf2v)
    with pytest.raises(ValueError, match="FLF2V\\) DiT needs end_image"):
        flf2v("the cat", seed=0, input_image=Image.new("RGB", (SIZE, SIZE)), **KW)
    ti2v = load(wan_files.ti2v)
    with pytest.raises(ValueError, match="height=48 is not a multiple of 32"):
        ti2v("the cat", seed=0, **{**KW, "height": 48})


# ---------------------------------------------------------------------- LoRA
RANK = 2


def lora_pair(weight: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, weight.shape[1], generator=generator), torch.randn(
        weight.shape[0], RANK, generator=generator
    )


LAYERS = {  # diffusers name -> official (ours)
    "blocks.0.attn1.to_q": "blocks.0.self_attn.q",
    "blocks.1.attn2.to_out.0": "blocks.1.cross_attn.o",
    "blocks.0.ffn.net.0.proj": "blocks.0.ffn.0",
    "proj_out": "head.head",
}


def write_lora(path, dit, style: str) -> dict[str, torch.Tensor]:
    """A LoRA over LAYERS in ``style``; returns the expected weight change of each of our layers."""
    state, deltas = {}, {}
    for index, (theirs, ours) in enumerate(LAYERS.items()):
        down, up = lora_pair(dit.get_submodule(ours).weight, seed=index)
        alpha = 1.0 if style == "comfyui" else None
        deltas[ours] = (alpha / RANK if alpha else 1.0) * up @ down
        if style == "diffusers":
            state[f"transformer.{theirs}.lora_A.weight"], state[f"transformer.{theirs}.lora_B.weight"] = down, up
        elif style == "comfyui":
            state[f"diffusion_model.{ours}.lora_down.weight"], state[f"diffusion_model.{ours}.lora_up.weight"] = (
                down,
                up,
            )
            state[f"diffusion_model.{ours}.alpha"] = torch.tensor(alpha)
        elif style == "kohya":
            flat = "lora_unet_" + ours.replace(".", "_")
            state[f"{flat}.lora_down.weight"], state[f"{flat}.lora_up.weight"] = down, up
        else:  # DiffSynth / peft on our names
            state[f"{ours}.lora_A.default.weight"], state[f"{ours}.lora_B.default.weight"] = down, up
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return deltas


@pytest.mark.parametrize("style", ["diffusers", "comfyui", "kohya", "diffsynth"])
def test_lora_formats_fuse_exactly_on_the_chosen_expert(wan_files, tmp_path, style):  # noqa: F811
    pipe = load(wan_files.a14b)
    before = {name: {k: v.clone() for k, v in pipe._components[name].state_dict().items()} for name in ("dit", "dit2")}
    deltas = write_lora(tmp_path / "lora.safetensors", pipe.dit2, style)
    pipe.load_lora(tmp_path / "lora.safetensors", scale=0.5, fuse=True, expert="low_noise")
    after = pipe.dit2.state_dict()
    for layer, delta in deltas.items():
        torch.testing.assert_close(after[f"{layer}.weight"], before["dit2"][f"{layer}.weight"] + 0.5 * delta)
    untouched = [k for k in after if k.removesuffix(".weight") not in deltas]
    assert all(torch.equal(after[k], before["dit2"][k]) for k in untouched)
    assert all(torch.equal(v, before["dit"][k]) for k, v in pipe.dit.state_dict().items())  # the other expert


def test_hot_lora_on_both_experts_matches_fused_and_clears(wan_files, tmp_path):  # noqa: F811
    hot, fused = load(wan_files.a14b), load(wan_files.a14b)
    write_lora(tmp_path / "lora.safetensors", hot.dit, "diffusers")
    plain = hot("the cat", noise=noise_for(), **KW)
    assert hot.load_lora(tmp_path / "lora.safetensors", scale=0.3) == "lora"
    fused.load_lora(tmp_path / "lora.safetensors", scale=0.3, fuse=True)
    with_lora = hot("the cat", noise=noise_for(), **KW)
    assert np.abs(pixels(with_lora) - pixels(fused("the cat", noise=noise_for(), **KW))).max() <= 1
    assert np.abs(pixels(with_lora) - pixels(plain)).mean() > 1
    hot.clear_lora()
    assert np.array_equal(pixels(hot("the cat", noise=noise_for(), **KW)), pixels(plain))
    with pytest.raises(ValueError, match="expert='middle'; use 'all', 'high_noise' or 'low_noise'"):
        hot.load_lora(tmp_path / "lora.safetensors", expert="middle")


def test_low_noise_lora_needs_an_a14b_pair(t2v, tmp_path):
    write_lora(tmp_path / "lora.safetensors", t2v.dit, "diffsynth")
    with pytest.raises(ValueError, match="expert='low_noise': no such DiT is loaded"):
        t2v.load_lora(tmp_path / "lora.safetensors", expert="low_noise")


# ---------------------------------------------------------------------- layouts, VRAM, video file
OFFICIAL_CONFIG = {
    "_class_name": "WanModel",
    "model_type": "t2v",
    "dim": 24,
    "ffn_dim": 48,
    "freq_dim": 256,
    "in_dim": 16,
    "out_dim": 16,
    "num_heads": 2,
    "num_layers": 2,
    "text_len": 512,
    "eps": 1e-06,
}


def write_official_experts(pipe: WanVideoPipeline, repo) -> None:
    for component, folder in (("dit", "high_noise_model"), ("dit2", "low_noise_model")):
        state = {k: v.contiguous() for k, v in pipe._components[component].state_dict().items()}
        (repo / folder).mkdir(parents=True)
        save_file(state, repo / folder / "diffusion_pytorch_model.safetensors")
        # Wan-AI folders carry the WanModel config; the head count is not in the shapes.
        (repo / folder / "config.json").write_text(json.dumps(OFFICIAL_CONFIG))


def test_official_layout_and_model_configs_give_the_same_video(wan_files, tmp_path):  # noqa: F811
    reference = load(wan_files.a14b)
    expected = pixels(reference("the cat", noise=noise_for(), **KW))
    official = tmp_path / "Wan2.2-T2V-A14B"
    write_official_experts(reference, official)
    torch.save(reference.vae.state_dict(), official / "Wan2.1_VAE.pth")
    shutil.copytree(wan_files.tokenizer_path, official / "google" / "umt5-xxl")
    text_encoder = wan_files.a14b / "text_encoder"
    pipe = load(official, model_configs={"text_encoder": text_encoder})
    assert np.array_equal(pixels(pipe("the cat", noise=noise_for(), **KW)), expected)
    listed = WanVideoPipeline.from_pretrained(
        model_configs=[
            official / "high_noise_model" / "diffusion_pytorch_model.safetensors",
            official / "low_noise_model" / "diffusion_pytorch_model.safetensors",
            official / "Wan2.1_VAE.pth",
            text_encoder,
            official / "google" / "umt5-xxl",
        ],
        torch_dtype=torch.float32,
        device="cpu",
        progress_bar=False,
    )
    assert np.array_equal(pixels(listed("the cat", noise=noise_for(), **KW)), expected)
    with pytest.raises(ValueError, match="high_noise_model: no files for tokenizer, text_encoder, vae in this folder"):
        WanVideoPipeline.from_pretrained(official / "high_noise_model", device="cpu")


def test_preset_and_model_id_load_offline(wan_files, tmp_path, monkeypatch):  # noqa: F811
    """A preset's files where ds_loader keeps downloads (<base>/<model id>/...), every one in the Wan-AI layout."""
    from tests.models.wan.test_encoders import official_t5_state

    reference = load(wan_files.a14b)
    # A preset samples with its release's official values when the caller sets none: shift 12, guidance 3 / 4.
    official = dict(sigma_shift=12.0, cfg_scale=3.0, cfg_scale_high_noise=4.0)
    expected = pixels(reference("the cat", noise=noise_for(), **KW, **official))
    assert np.abs(pixels(reference("the cat", noise=noise_for(), **KW)) - expected).max() > 1
    repo = tmp_path / "Wan-AI" / "Wan2.2-T2V-A14B"
    write_official_experts(reference, repo)
    torch.save(reference.vae.state_dict(), repo / "Wan2.1_VAE.pth")
    torch.save(official_t5_state(wan_files.text_encoder), repo / "models_t5_umt5-xxl-enc-bf16.pth")
    shutil.copytree(wan_files.tokenizer_path, tmp_path / "Wan-AI" / "Wan2.1-T2V-1.3B" / "google" / "umt5-xxl")
    monkeypatch.setenv("DIFFSYNTH_MODEL_BASE_PATH", str(tmp_path))
    monkeypatch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")  # no network: the files are already there
    for name in ("wan2.2-t2v-a14b", "Wan-AI/Wan2.2-T2V-A14B"):
        pipe = load(name)
        assert pipe.boundary == 0.875 and pipe.fps == 16 and pipe.model_name == name
        assert {key: pipe.sampling_defaults[key] for key in official} == official
        assert np.abs(pixels(pipe("the cat", noise=noise_for(), **KW)) - expected).max() <= 1


def test_vram_managed_models_give_the_same_video(t2v, wan_files):  # noqa: F811
    from ds_vram import get_vram_handle

    config = VRAMConfig(storage="cpu", computation_device="cpu", computation_dtype=torch.float32)
    managed = load(wan_files.t2v, vram=config)
    assert all(get_vram_handle(managed._components[name]) is not None for name in ("dit", "vae", "text_encoder"))
    expected = pixels(t2v("the cat", noise=noise_for(), **KW))
    assert np.abs(pixels(managed("the cat", noise=noise_for(), **KW)) - expected).max() <= 1


def test_generated_video_saves_at_native_fps_with_its_parameters(t2v, tmp_path):
    frames = t2v("the cat", seed=5, **KW)
    path = save_video(frames, tmp_path / "cat.mp4", progress_bar=False)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    assert meta["fps"] == 16 and meta["size"] == (SIZE, SIZE) and sum(1 for _ in reader) == FRAMES
    loaded = load_video(path)
    assert loaded.parameters["prompt"] == "the cat" and loaded.parameters["seed"] == 5
    assert loaded.parameters["num_frames"] == FRAMES and loaded.fps == 16


def test_bfloat16_follows_float32(wan_files):  # noqa: F811
    """bf16 weights and DiT inputs (latents stay float32 between steps, as the official loop keeps them)."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    videos = [
        pixels(load(wan_files.i2v, torch_dtype=dtype)("the cat", seed=0, input_image=image, **KW))
        for dtype in (torch.float32, torch.bfloat16)
    ]
    assert np.abs(videos[0] - videos[1]).mean() < 3
