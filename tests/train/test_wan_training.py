"""ds_train on the tiny Wan models: video and image clips in one dataset, LoRA and full training of the T2V DiT,
the first-frame conditions of I2V, one expert of an A14B pair at its own noise levels, and LoRA files that mean the
same in our pipeline and in diffusers."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from ds_pipelines import WanVideoPipeline
from ds_train import (
    DatasetError,
    ImageDataset,
    TrainingConfig,
    family_of_model,
    load_cached,
    train,
)
from ds_train.wan import WanTrainingAdapter
from tests.train.conftest import write_clips

BASE = dict(
    height=32,
    width=32,
    num_frames=5,
    mixed_precision="no",
    device="cpu",
    seed=0,
    progress_bar=False,
    tensorboard=False,
    checkpoint_every=0,
)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    return write_clips(tmp_path_factory.mktemp("clips"))


def config(model, data, output, **overrides) -> TrainingConfig:
    return TrainingConfig(**dict(BASE, model=model, data=data, output=output) | overrides)


def test_video_dataset_clips_images_and_shapes(clips, tmp_path):
    dataset = ImageDataset(clips, 32, 32, num_frames=5)
    by_name = {sample.image.name: frames for sample, frames in zip(dataset.samples, dataset.frames, strict=True)}
    assert by_name == {"blue.mp4": 5, "green.mp4": 5, "red.mp4": 5, "short.mp4": 1, "still.png": 1}
    red = dataset[[s.image.name for s in dataset.samples].index("red.mp4")]["pixels"]
    assert red.shape == (3, 5, 32, 32) and red.min() >= -1 and red.max() <= 1
    # The square moves: frames differ, and it moves right (its red mass drifts to higher columns).
    columns = torch.arange(32.0)
    red_mask = (red[0] > 0.5) & (red[1] < 0)
    centres = [(red_mask[f].float().sum(0) * columns).sum() / red_mask[f].sum() for f in range(5)]
    assert all(b > a for a, b in itertools.pairwise(centres))
    assert dataset[[s.image.name for s in dataset.samples].index("still.png")]["pixels"].shape == (3, 1, 32, 32)
    assert "4 videos, 1 images; 1 clips shorter than 5 frames" in dataset.describe()
    # A batch never mixes shapes: 5-frame clips and 1-frame items are drawn apart.
    for batch in dataset.batches(2, torch.Generator().manual_seed(0)):
        assert len({dataset.shape_of(index) for index in batch}) == 1
    # Every other frame: 7 frames at stride 2 give 4, cut to the 1 + 4k that fits.
    strided = ImageDataset(clips, 32, 32, num_frames=5, frame_stride=2)
    assert max(strided.frames) == 1

    # A metadata table with a "video" column, one row pointing at a missing clip.
    table = tmp_path / "metadata.csv"
    table.write_text(f"video,prompt\n{clips / 'red.mp4'},a red square\nmissing.mp4,a missing clip\n")
    with pytest.raises(DatasetError, match=r"metadata\.csv row 2: .*missing\.mp4: file not found"):
        ImageDataset(table, 32, 32, num_frames=5)
    with pytest.warns(UserWarning, match="dropped 1 broken row"):
        assert ImageDataset(table, 32, 32, num_frames=5, skip_broken=True).frames == [5]

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.mp4").write_bytes(b"not a video")
    (broken / "bad.txt").write_text("a broken clip")
    with pytest.raises(DatasetError, match=r"bad\.mp4: .*unreadable video"):
        ImageDataset(broken, 32, 32, num_frames=5)
    with pytest.raises(ValueError, match="no images"):  # an image model does not look at videos
        ImageDataset(broken, 32, 32)
    with pytest.raises(ValueError, match="1 \\+ k \\* 4"):
        ImageDataset(clips, 32, 32, num_frames=6)


def test_family_is_recognised_and_wan_settings_are_checked(wan_files, clips, tmp_path):
    assert family_of_model(wan_files.t2v) == "wan"
    assert family_of_model({"dit": wan_files.t2v / "transformer"}) == "wan"
    with pytest.raises(ValueError, match=r"'guidance' is not one Wan \('wan'\) takes; it takes: expert, boundary"):
        train(config(wan_files.t2v, clips, tmp_path / "run", family_options={"guidance": 3.5}, steps=1))
    with pytest.raises(ValueError, match=r"expert='middle' \(wan\) must be one of 'high_noise', 'low_noise'"):
        train(config(wan_files.t2v, clips, tmp_path / "run", family_options={"expert": "middle"}, steps=1))
    with pytest.raises(ValueError, match=r"has two experts; set family_options\['expert'\]"):
        train(config(wan_files.a14b, clips, tmp_path / "pair", steps=1))
    with pytest.raises(ValueError, match=r"needs a Wan2\.2 A14B pair"):
        train(config(wan_files.t2v, clips, tmp_path / "one", family_options={"expert": "low_noise"}, steps=1))
    with pytest.raises(ValueError, match="num_frames=6 must be of the form 1 \\+ k \\* 4"):
        train(config(wan_files.t2v, clips, tmp_path / "frames", num_frames=6, steps=1))
    with pytest.raises(ValueError, match="height=48 is not a multiple of 32"):  # the 2.2 VAE compresses 16x
        train(config(wan_files.ti2v, clips, tmp_path / "size", height=48, width=64, steps=1))


@pytest.fixture(scope="module")
def trained(wan_files, clips, tmp_path_factory):
    output = tmp_path_factory.mktemp("wan-lora")
    run = config(wan_files.t2v, clips, output, steps=4, learning_rate=5e-2, lora_rank=4, lora_alpha=2.0)
    run.batch_size = 2
    return train(run)


def dit_inputs(config, frames: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(1, config.in_dim, frames, 4, 4, generator=generator),
        "timestep": torch.tensor([700.0]),
        "context": torch.randn(1, 7, config.text_dim, generator=generator),
    }


def test_lora_on_videos_loads_with_the_same_effect_here_and_in_diffusers(wan_files, trained, tmp_path):
    assert len(trained.losses) == 4 and all(torch.isfinite(torch.tensor(trained.losses)))
    path = trained.weights_path
    with safe_open(path, "pt") as file:
        keys, metadata = set(file.keys()), file.metadata()
    assert "diffusion_model.blocks.1.cross_attn.o.lora_down.weight" in keys
    assert "diffusion_model.blocks.0.ffn.2.lora_up.weight" in keys
    assert metadata["ss_network_dim"] == "4" and metadata["modelspec.resolution"] == "32x32"

    pipe = WanVideoPipeline.from_pretrained(wan_files.t2v, device="cpu", torch_dtype=torch.float32)
    inputs = dit_inputs(pipe.dit.config)
    with torch.no_grad():
        base = pipe.dit(**inputs)
        pipe.load_lora(path)
        ours = pipe.dit(**inputs)
    assert (ours - base).abs().max() > 1e-3

    # The same LoRA saved in diffusers format, in diffusers' own WanTransformer3DModel.
    from ds_train import convert_lora_file

    diffusers_path = convert_lora_file(path, tmp_path / "lora-diffusers.safetensors", to="diffusers")
    theirs = copy.deepcopy(wan_files.t2v_transformer)
    with safe_open(diffusers_path, "pt") as file:
        state = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    theirs.load_lora_adapter(state, prefix="transformer", adapter_name="trained")
    with torch.no_grad():
        reference = theirs(
            hidden_states=inputs["latents"],
            timestep=inputs["timestep"],
            encoder_hidden_states=torch.nn.functional.pad(inputs["context"], (0, 0, 0, 512 - 7)),
            return_dict=False,
        )[0]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_full_training_learns_and_saves_a_loadable_dit(wan_files, clips, tmp_path):
    result = train(
        config(wan_files.t2v, clips, tmp_path / "run", mode="full", steps=60, learning_rate=2e-3, cache=True)
    )
    first, last = sum(result.losses[:8]) / 8, sum(result.losses[-15:]) / 15
    assert last < 0.6 * first, (first, last)
    pipe = WanVideoPipeline.from_pretrained(
        wan_files.t2v, model_configs={"dit": result.weights_path}, device="cpu", torch_dtype=torch.float32
    )
    with safe_open(result.weights_path, "pt") as file:
        trained_weight = file.get_tensor("blocks.0.self_attn.q.weight")
    torch.testing.assert_close(pipe.dit.blocks[0].self_attn.q.weight, trained_weight)


def test_image_to_video_conditions_come_from_the_first_frame(wan_files, clips, tmp_path):
    run = config(wan_files.i2v, clips, tmp_path / "i2v", steps=2, lora_rank=2, cache=True, caption_dropout=0.5)
    result = train(run)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    conditions, latents = load_cached(tmp_path / "i2v" / "cache" / "000000.safetensors")
    assert set(conditions) == {"context", "condition", "clip_feature"}
    assert conditions["condition"].shape == (20, *latents.shape[1:])  # 4 mask + 16 latent channels per frame
    mask = conditions["condition"][:4]
    assert mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()  # only the first frame is given
    empty, _ = load_cached(tmp_path / "i2v" / "cache" / "empty.safetensors")
    assert set(empty) == {"context"}  # caption dropout replaces the prompt only


def test_one_a14b_expert_trains_at_its_own_noise_levels(wan_files, clips, tmp_path):
    high, low = WanTrainingAdapter(expert="high_noise"), WanTrainingAdapter(expert="low_noise")
    assert (high.trainable_model, low.trainable_model) == ("dit", "dit2") and "dit" in low.encoders
    pipe = WanVideoPipeline.from_pretrained(wan_files.a14b, device="cpu", torch_dtype=torch.float32)
    latents = torch.zeros(4096, 16, 2, 4, 4)
    generator = torch.Generator().manual_seed(0)
    high_sigmas = high.sample_sigmas(pipe, latents, generator, "uniform")
    low_sigmas = low.sample_sigmas(pipe, latents, generator, "uniform")
    assert high_sigmas.min() >= 0.875 and high_sigmas.max() <= 1
    assert low_sigmas.max() < 0.875 and low_sigmas.min() >= 0
    # Uniform in the unshifted grid, so about as many low-noise sigmas fall below the median as the shift says.
    everything = WanTrainingAdapter().sample_sigmas(pipe, latents, generator, "uniform")
    share_high = (everything >= 0.875).float().mean()
    assert abs(share_high - (1 - 0.875 / (5 - 4 * 0.875))) < 0.03

    low_expert = {"expert": "low_noise"}
    result = train(config(wan_files.a14b, clips, tmp_path / "low", family_options=low_expert, steps=2, lora_rank=2))
    with safe_open(result.weights_path, "pt") as file:
        assert any(key.startswith("diffusion_model.blocks.") for key in file.keys())  # noqa: SIM118
    pipe.load_lora(result.weights_path, expert="low_noise")
    assert pipe.dit2 is not None


class _Recorder(torch.nn.Module):
    """Stands in for the DiT: records what it is called with and predicts zeros."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(patch_size=(1, 2, 2))
        self.calls = []

    def forward(self, latents, timesteps, context, clip_feature=None, condition=None):
        self.calls.append((latents.clone(), timesteps.clone()))
        return torch.zeros_like(latents)


def test_ti2v_first_frame_is_given_clean_at_timestep_zero_and_left_out_of_the_loss(wan_files, clips, tmp_path):
    adapter = WanTrainingAdapter(first_frame_conditioning=True)
    latents, noisy = torch.randn(2, 48, 3, 4, 6), torch.randn(2, 48, 3, 4, 6)
    conditions = {"context": torch.zeros(2, 7, 32), "first_frame": latents[:, :, :1]}
    model = _Recorder()
    adapter.predict(model, noisy, torch.tensor([0.25, 0.75]), conditions)
    seen, timesteps = model.calls[0]
    torch.testing.assert_close(seen[:, :, :1], latents[:, :, :1])  # the given frame, clean
    torch.testing.assert_close(seen[:, :, 1:], noisy[:, :, 1:])
    assert timesteps.shape == (2, 3 * 2 * 3)  # one per token: 3 frames of 2x3 patches
    assert timesteps[:, :6].eq(0).all() and timesteps[0, 6:].eq(250).all() and timesteps[1, 6:].eq(750).all()
    mask = adapter.loss_mask(conditions, latents)
    assert mask[0, 0, :, 0, 0].tolist() == [0, 1, 1]

    run = config(wan_files.ti2v, clips, tmp_path / "ti2v", steps=2, lora_rank=2, cache=True)
    result = train(dataclasses.replace(run, family_options={"first_frame_conditioning": True}))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    cached, cached_latents = load_cached(tmp_path / "ti2v" / "cache" / "000000.safetensors")
    torch.testing.assert_close(cached["first_frame"], cached_latents[:, :1], rtol=1e-4, atol=1e-4)
    # Which holds because the 2.2 VAE is causal: the first frame alone encodes to the clip's first latent frame.
    pipe = WanVideoPipeline.from_pretrained(wan_files.ti2v, device="cpu", torch_dtype=torch.float32)
    clip = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = pipe.encode_video(clip, tiled=False)
    torch.testing.assert_close(pipe.encode_video(clip[:, :, :1], tiled=False), whole[:, :, :1], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match=r"first_frame_conditioning trains Wan2\.2-TI2V-5B"):
        given = {"first_frame_conditioning": True}
        train(dataclasses.replace(run, output=tmp_path / "t2v", model=wan_files.t2v, family_options=given))


def test_streamed_checkpointed_training_of_an_expert_matches_plain_and_samples_a_video(wan_files, clips, tmp_path):
    common = dict(family_options={"expert": "high_noise"}, steps=3, lora_rank=4, learning_rate=1e-2)
    plain = train(config(wan_files.a14b, clips, tmp_path / "plain", **common))
    streamed = train(
        config(
            wan_files.a14b,
            clips,
            tmp_path / "streamed",
            stream_frozen=True,
            vram_limit=0,
            gradient_checkpointing=True,
            sample_every=3,
            sample_prompts=("a red square moving right",),
            sample_inference_steps=2,
            **common,
        )
    )
    torch.testing.assert_close(torch.tensor(streamed.losses), torch.tensor(plain.losses), rtol=1e-5, atol=1e-6)
    fp8 = train(config(wan_files.a14b, clips, tmp_path / "fp8", fp8_frozen=True, **common))
    torch.testing.assert_close(torch.tensor(fp8.losses), torch.tensor(plain.losses), rtol=0.05, atol=0.02)
    assert [path.name for path in streamed.samples] == ["step-000003-0.mp4"]
    from ds_pipelines.media import load_video

    assert len(load_video(streamed.samples[0])) == 5
