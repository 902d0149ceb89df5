"""The shipped ``demo-digits`` preset: it loads offline from package data, and what it draws is the digit asked for.

The judge is independent of the model: a logistic regression trained on scikit-learn's 8x8 digits (the data the
demo was trained on), reading each generated 32x32 image averaged down to 8x8 grey levels 0..16. The 50 samples
are drawn in one batch through the pipeline's own steps (encode_prompt, denoise, decode) with the settings
``FluxImagePipeline.__call__`` uses for the preset's defaults; one test checks that ``__call__`` gives the same
image, and one runs the CLI's default dtype (bfloat16).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ds_models_flux import FluxDiT, FluxVAE, get_preset
from ds_pipelines import FluxImagePipeline
from ds_pipelines.catalog import DEFAULT_MODEL, preset_defaults
from ds_pipelines.media import tensor_to_images
from ds_pipelines.schedulers import FlowMatchScheduler

SEEDS = (0, 1, 2, 3, 4)


def to_8x8(images: list[Image.Image]) -> np.ndarray:
    """Images as scikit-learn stores its digits: 8x8 grey, 0 (paper) to 16 (ink), flattened."""
    grey = torch.stack([torch.from_numpy(np.asarray(i.convert("L"), dtype=np.float32)) for i in images])[:, None]
    return (torch.nn.functional.adaptive_avg_pool2d(grey / 255.0, 8) * 16).clamp(0, 16).flatten(1).numpy()


@pytest.fixture(scope="module")
def classifier():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    return LogisticRegression(max_iter=5000).fit(digits.data, digits.target)


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as patch:
        # a preset of local files must never reach for a hub, even with a download source set
        patch.setenv("DIFFSYNTH_SKIP_DOWNLOAD", "1")
        patch.setenv("DIFFSYNTH_DOWNLOAD_SOURCE", "huggingface")
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def pipe(offline) -> FluxImagePipeline:
    return FluxImagePipeline.from_pretrained(
        "demo-digits", torch_dtype=torch.float32, device="cpu", progress_bar=False
    )


def sample(pipe: FluxImagePipeline, digits: list[int], seeds: list[int]) -> list[Image.Image]:
    """What ``pipe(f"a handwritten digit {d}", seed=s, **preset_defaults("demo-digits"))`` draws, batched."""
    options = preset_defaults("demo-digits")
    size, steps, cfg = options["height"], options["num_inference_steps"], options["cfg_scale"]
    noise = torch.cat([pipe.generate_noise((1, 16, size // 8, size // 8), seed) for seed in seeds])
    scheduler = FlowMatchScheduler("flux.1-schnell")  # the template __call__ picks for a DiT without guidance_in
    scheduler.set_timesteps(steps, image_sequence_length=(size // 16) ** 2)
    positive = pipe.encode_prompt([f"a handwritten digit {d}" for d in digits])
    negative = pipe.encode_prompt([""] * len(digits))
    latents = pipe.denoise(noise, positive, negative, scheduler, cfg, None, [], None)
    return tensor_to_images(pipe.decode(latents))


def test_the_preset_is_local_package_data_in_the_flux_layout(offline) -> None:
    preset = get_preset("demo-digits")
    assert DEFAULT_MODEL == "demo-digits"
    configs = preset.model_configs(download_source="huggingface")
    for name, config in configs.items():
        paths = config.resolve()  # path= configs: no network, and every file is there
        assert config.model_id is None and paths and all(p.exists() for p in paths), name
        assert all("ds_models_flux/demo_digits/" in p.as_posix() for p in paths), paths
    assert configs["dit"].resolve()[0].name == "flux1-demo-digits.safetensors"
    total = sum(p.stat().st_size for p in preset.files["dit"].folder.rglob("*") if p.is_file())
    assert total < 8 * 2**20
    defaults = preset_defaults("demo-digits")  # what `diffsynth generate` runs it with
    assert defaults == {"num_inference_steps": preset.steps, "cfg_scale": preset.cfg_scale, "height": 32, "width": 32}


def test_a_preset_file_missing_from_its_local_folder_is_named(tmp_path) -> None:
    from ds_models_flux import FluxFile

    config = FluxFile(str(tmp_path), "text_encoder_2/*.safetensors", folder=tmp_path).model_config("huggingface")
    with pytest.raises(FileNotFoundError, match=r"text_encoder_2/\*\.safetensors"):
        config.resolve()


def test_it_loads_offline_and_casts_the_float16_files(pipe: FluxImagePipeline) -> None:
    assert isinstance(pipe.dit, FluxDiT) and isinstance(pipe.vae, FluxVAE)
    assert not pipe.dit.config.guidance_embed and (pipe.dit.config.depth, pipe.dit.config.depth_single_blocks) == (
        2,
        2,
    )
    for model in (pipe.dit, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert pipe.default_t5_sequence_length() == get_preset("demo-digits").t5_sequence_length == 8
    clip_ids = [pipe.tokenizer(f"a handwritten digit {d}").input_ids for d in range(10)]
    t5_ids = [pipe.tokenizer_2(f"a handwritten digit {d}").input_ids for d in range(10)]
    for ids, unknown in ((clip_ids, None), (t5_ids, pipe.tokenizer_2.unk_token_id)):
        assert len({i[-2] for i in ids}) == 10 and len({len(i) for i in ids}) == 1  # one distinct token per digit
        assert unknown is None or all(unknown not in i for i in ids)
    assert pipe.tokenizer_2("a handwritten digit seven").input_ids != t5_ids[7]  # words are other tokens


def test_generated_digits_are_the_digits_asked_for(pipe: FluxImagePipeline, classifier) -> None:
    wanted = np.repeat(np.arange(10), len(SEEDS))
    images = sample(pipe, wanted.tolist(), list(SEEDS) * 10)
    assert {image.size for image in images} == {(32, 32)}
    seen = classifier.predict(to_8x8(images))
    per_digit = {d: float((seen[wanted == d] == d).mean()) for d in range(10)}
    assert (seen == wanted).mean() >= 0.8, per_digit
    assert min(per_digit.values()) >= 0.4, per_digit  # no digit is drawn as another one
    # the prompt decides, not the seed: seed 0 asked for each digit gives (nearly) ten different readings
    assert len(set(seen[:: len(SEEDS)].tolist())) >= 8


def test_call_with_the_preset_defaults_draws_the_same(pipe: FluxImagePipeline) -> None:
    image = pipe("a handwritten digit 3", seed=2, **preset_defaults("demo-digits"))
    batched = sample(pipe, [7, 3], [0, 2])[1]
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(batched, dtype=np.int16))
    assert difference.max() <= 2  # rounding of batched vs single matmuls only


def test_bfloat16_as_the_cli_loads_it(offline, classifier) -> None:
    bf16 = FluxImagePipeline.from_pretrained("demo-digits", device="cpu", progress_bar=False)
    assert bf16.dit.img_in.weight.dtype == torch.bfloat16
    images = sample(bf16, list(range(10)), [0] * 10)
    assert (classifier.predict(to_8x8(images)) == np.arange(10)).mean() >= 0.8


def test_a_bare_call_samples_with_the_preset_defaults():
    """``pipe(prompt)`` on demo-digits is the CLI's image: 32x32, 12 steps, cfg 2, not FLUX.1-dev's 1024x1024."""
    pipe = FluxImagePipeline.from_pretrained("demo-digits", device="cpu", torch_dtype=torch.float32)
    preset = get_preset("demo-digits")
    expected = {"cfg_scale": preset.cfg_scale, "height": 32, "width": 32, "num_inference_steps": preset.steps}
    assert {key: pipe.sampling_defaults[key] for key in expected} == expected
    image = pipe("a handwritten digit 3", seed=1)
    explicit = pipe("a handwritten digit 3", seed=1, **preset_defaults("demo-digits"))
    assert image.size == (32, 32)
    assert np.array_equal(np.asarray(image), np.asarray(explicit))
