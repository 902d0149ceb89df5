"""The plug-in boundary: a model family defined only in this file reaches every layer without an edit to a shared one.

The toy family has its own DiT (a few joint-attention blocks over 4x4 space-to-depth "latents"), a ds-loader
``ModelSpec`` that detects its checkpoints, a ``Preset`` whose files are written to a temporary folder, a pipeline on
the shared ``Pipeline.from_pretrained`` with its one ``predict`` step, and a training adapter. Registered through the
public calls (``register_spec``, ``register_family``), it must be listed by ``diffsynth models list``, generate with
``diffsynth generate --model toy-tiny``, train a LoRA with ``diffsynth train lora --model toy-tiny`` and load that
LoRA back, and pass the family contract of ``tests/test_families.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ds_cli.main import main
from ds_loader import ModelSpec, register_spec, unregister_spec
from ds_loader.families import FamilyDescriptor, LoraNaming, LoraTarget, Preset, PresetFile, TokenLayout
from ds_loader.spec import Detection, Mismatch
from ds_models_core import FlowMatchTemplate, timestep_embedding
from ds_pipelines import Pipeline, pipeline_step, register_family, unregister_family
from ds_pipelines.media import tensor_to_images
from ds_train import TrainingAdapter
from tests import test_families as contract

FAMILY_ID = "toy"
PRESET = "toy-tiny"
DIT_FILE = "toy-dit.safetensors"
PATCH = 4  # pixels per latent side: the toy VAE is a 4x4 space-to-depth
TEXT_TOKENS = 8
BLOCK_LAYERS = ("qkv", "proj", "mlp_in", "mlp_out", "mod")


# ---------------------------------------------------------------------------------------------- the models
@dataclass(frozen=True)
class ToyDiTConfig:
    in_channels: int = 3 * PATCH * PATCH
    hidden_size: int = 32
    depth: int = 2
    num_heads: int = 2
    text_dim: int = 16


class ToyBlock(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.mod = nn.Linear(hidden, 2 * hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp_in = nn.Linear(hidden, 2 * hidden)
        self.mlp_out = nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod(F.silu(vec))[:, None].chunk(2, dim=-1)
        q, k, v = (
            self.qkv(self.norm(x) * (1 + scale) + shift).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        )
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        return x + self.mlp_out(F.gelu(self.mlp_in(self.norm(x))))


class ToyDiT(nn.Module):
    """Text tokens and image tokens (B, N, in_channels) in joint attention; returns the image tokens' velocity."""

    def __init__(self, config: ToyDiTConfig):
        super().__init__()
        self.config = config
        self.img_in = nn.Linear(config.in_channels, config.hidden_size)
        self.txt_in = nn.Linear(config.text_dim, config.hidden_size)
        self.time_in = nn.Linear(config.hidden_size, config.hidden_size)
        self.layers = nn.ModuleList(ToyBlock(config.hidden_size, config.num_heads) for _ in range(config.depth))
        self.final = nn.Linear(config.hidden_size, config.in_channels)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        vec = self.time_in(timestep_embedding(sigmas * 1000, self.config.hidden_size).to(tokens.dtype))
        x = torch.cat([self.txt_in(text), self.img_in(tokens)], dim=1)
        for layer in self.layers:
            x = layer(x, vec)
        return self.final(x[:, text.shape[1] :])


class ToyVAE(nn.Module):
    """A weightless autoencoder with the ``ds_models_core.VAE`` names: 4x4 pixel blocks become 48 channels."""

    spatial_compression = PATCH
    temporal_compression = 1
    latent_channels = 3 * PATCH * PATCH

    def encode(self, pixels: torch.Tensor, tiled: bool = False, **kwargs: Any) -> torch.Tensor:
        return F.pixel_unshuffle(pixels, PATCH)

    def decode(self, latents: torch.Tensor, tiled: bool = False, **kwargs: Any) -> torch.Tensor:
        return F.pixel_shuffle(latents, PATCH)


class ToyTextEncoder(nn.Module):
    """Bytes of the prompt, embedded by a fixed random table: (B, TEXT_TOKENS, text_dim)."""

    def __init__(self, dim: int = ToyDiTConfig.text_dim):
        super().__init__()
        self.register_buffer("table", torch.randn(256, dim, generator=torch.Generator().manual_seed(7)), False)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), TEXT_TOKENS, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            data = list(prompt.encode("utf-8"))[:TEXT_TOKENS]
            ids[row, : len(data)] = torch.tensor(data, dtype=torch.long)
        return self.table[ids]


def _detect(view: Any) -> Detection | Mismatch:
    needed = ("img_in.weight", "txt_in.weight", "final.weight", "layers.0.qkv.weight")
    if not all(key in view for key in needed):
        return Mismatch("not a toy DiT: no img_in / txt_in / final / layers.0.qkv weights")
    hidden, in_channels = view.shape("img_in.weight")
    config = ToyDiTConfig(
        in_channels=in_channels,
        hidden_size=hidden,
        depth=view.count_blocks("layers."),
        text_dim=view.shape("txt_in.weight")[1],
    )
    return Detection("official", config)


TOY_SPEC = ModelSpec(
    name="toy.dit",
    family=FAMILY_ID,
    model_class=ToyDiT,
    config_class=ToyDiTConfig,
    detect=_detect,
    formats={"official": None},
)


# ---------------------------------------------------------------------------------------------- the pipeline
class ToyPipeline(Pipeline):
    """Text to image with the toy DiT: the shape every image family's pipeline has, at toy size."""

    family = FAMILY_ID
    component_names = ("text_encoder", "dit", "vae")
    required_components = ("dit",)
    default_options: ClassVar[Mapping[str, object]] = {
        "cfg_scale": 1.0,
        "height": 64,
        "width": 64,
        "num_inference_steps": 8,
    }

    @classmethod
    def folder_sources(cls, folder: Path) -> dict[str, object]:
        return {"dit": folder / DIT_FILE} if (folder / DIT_FILE).is_file() else {}

    @classmethod
    def load_components(
        cls, sources: Mapping[str, Any], *, device: torch.device, torch_dtype: torch.dtype, vram: Any
    ) -> dict[str, Any]:
        models: dict[str, Any] = cls.load_models(
            sources, {"dit": TOY_SPEC}, required=("dit",), device=device, torch_dtype=torch_dtype, vram=vram
        )
        return {**models, "vae": ToyVAE(), "text_encoder": ToyTextEncoder().to(device)}

    @staticmethod
    def predict(model: nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, conditions: Mapping[str, Any]):
        """Velocity for latents (B, 48, h, w) at ``sigmas`` (B,); conditions: ``text`` (B, 8, 16)."""
        batch, channels, height, width = latents.shape
        tokens = latents.flatten(2).transpose(1, 2)
        velocity = model(tokens, conditions["text"].to(latents.dtype), sigmas.to(latents.device, latents.dtype))
        return velocity.transpose(1, 2).reshape(batch, channels, height, width)

    @pipeline_step("text_encoder")
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        return self.text_encoder(prompts).to(self.device, self.torch_dtype)

    @pipeline_step("vae")
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(pixels.to(self.device, self.torch_dtype))

    @pipeline_step("dit")
    def denoise(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        negative: torch.Tensor | None,
        scheduler: Any,
        cfg_scale: float,
    ) -> torch.Tensor:
        for index, sigma in enumerate(self.progress(scheduler.timesteps, desc="denoising")):
            sigmas = torch.full((latents.shape[0],), float(sigma), device=self.device, dtype=self.torch_dtype)
            prediction = self.predict(self.dit, latents, sigmas, {"text": text})
            if negative is not None:
                baseline = self.predict(self.dit, latents, sigmas, {"text": negative})
                prediction = baseline + cfg_scale * (prediction - baseline)
            latents = scheduler.step(prediction, index, latents)
        return latents

    @pipeline_step("vae")
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        cfg_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        sigma_shift: float | None = None,
    ) -> Image.Image:
        from ds_pipelines import FlowMatchScheduler

        cfg_scale, height, width, steps = self.sampling_options(
            cfg_scale=cfg_scale, height=height, width=width, num_inference_steps=num_inference_steps
        ).values()
        if height % PATCH or width % PATCH:
            raise ValueError(f"height and width must be multiples of {PATCH}; got {height}x{width}")
        shape = (1, ToyVAE.latent_channels, height // PATCH, width // PATCH)
        latents = self.generate_noise(shape, seed) if noise is None else noise.to(self.device, self.torch_dtype)
        scheduler = FlowMatchScheduler(FAMILY_ID)
        scheduler.set_timesteps(steps, sigma_shift=sigma_shift)
        text = self.encode_prompt([prompt])
        negative = self.encode_prompt([negative_prompt]) if cfg_scale != 1.0 else None
        image = tensor_to_images(self.decode(self.denoise(latents, text, negative, scheduler, cfg_scale)))[0]
        image.info["diffsynth"] = json.dumps(
            {"prompt": prompt, "seed": seed, "steps": steps, "cfg_scale": cfg_scale, "model": self.model_name}
        )
        return image


# ---------------------------------------------------------------------------------------------- training
class ToyTrainingAdapter(TrainingAdapter):
    family = FAMILY_ID
    options: ClassVar[Mapping[str, tuple[Any, str]]] = {}
    default_lora_targets = ("layers.*.qkv", "layers.*.proj", "layers.*.mlp_in", "layers.*.mlp_out")
    encoders = ("text_encoder", "vae")

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {"text": pipe.encode_prompt(list(prompts))}

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        return pipe.encode_image(pixels)

    def sequence_length(self, latents: torch.Tensor) -> int:
        return latents.shape[-2] * latents.shape[-1]

    def estimated_tokens(self, pipe: Any, height: int, width: int, num_frames: int | None) -> int:
        return (height // PATCH) * (width // PATCH) + TEXT_TOKENS

    def scheduler(self, pipe: Any) -> Any:
        from ds_pipelines import FlowMatchScheduler

        return FlowMatchScheduler(FAMILY_ID)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        from ds_pipelines.base import unwrap_model

        return list(unwrap_model(model).layers)

    def sample(self, pipe: Any, prompt: str, seed: int, height: int, width: int, steps: int, **_: Any) -> Any:
        return pipe(prompt, seed=seed, height=height, width=width, num_inference_steps=steps)


# ---------------------------------------------------------------------------------------------- the descriptor
_OURS = re.compile(r"layers\.(\d+)\.(" + "|".join(BLOCK_LAYERS) + r")")
_DIFFUSERS = re.compile(r"toy_blocks\.(\d+)\.to_(" + "|".join(BLOCK_LAYERS) + r")")
_FLAT = re.compile(r"layers_(\d+)_(" + "|".join(BLOCK_LAYERS) + r")")


def _to_diffusers(layer: str) -> list[str] | None:
    match = _OURS.fullmatch(layer)
    return [f"toy_blocks.{match[1]}.to_{match[2]}"] if match else None


def _from_diffusers(name: str) -> LoraTarget | None:
    match = _DIFFUSERS.fullmatch(name)
    return LoraTarget(f"layers.{match[1]}.{match[2]}") if match else None


def _from_flat(flat: str) -> str | None:
    match = _FLAT.fullmatch(flat)
    return f"layers.{match[1]}.{match[2]}" if match else None


def _build_components(preset: Preset) -> dict[str, nn.Module]:
    return {"dit": ToyDiT(ToyDiTConfig()), "vae": ToyVAE()}


def toy_descriptor(folder: Path) -> FamilyDescriptor:
    return FamilyDescriptor(
        id=FAMILY_ID,
        title="Toy",
        kind="image",
        presets={
            PRESET: Preset(
                PRESET,
                {"dit": PresetFile("toy/tiny", DIT_FILE, folder=folder)},
                sampling={"height": 32, "width": 32, "num_inference_steps": 4},
                description="a toy family defined only in the tests",
            )
        },
        pipeline=f"{__name__}:ToyPipeline",
        training_adapter=f"{__name__}:ToyTrainingAdapter",
        dit_specs=("toy.dit",),
        component_specs={"toy.dit": "dit"},
        diffusers_classes=("ToyPipeline", "ToyTransformer2DModel"),
        build_components=_build_components,
        build_tiny_components=_build_components,  # the toy's released size is its tiny size
        token_layout=lambda preset: TokenLayout(1 / PATCH**2, text_tokens=TEXT_TOKENS),
        lora=LoraNaming(
            sign=re.compile(r"(?:^|[._])(?:layers|toy_blocks)[._]\d+[._](?:to_)?(?:" + "|".join(BLOCK_LAYERS) + ")"),
            to_diffusers=_to_diffusers,
            from_diffusers=_from_diffusers,
            from_flat=_from_flat,
            metadata={
                "ss_network_module": "networks.lora_toy",
                "ss_base_model_version": "toy",
                "modelspec.architecture": "toy/lora",
                "modelspec.implementation": "tests/apps/test_toy_family.py",
            },
        ),
        schedules={FAMILY_ID: FlowMatchTemplate(FAMILY_ID, shift=2.0)},
        default_size=(32, 32),
        description="a toy family defined only in the tests",
    )


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def toy_family(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FamilyDescriptor]:
    """The toy family registered (its spec and descriptor), with its DiT file written; unregistered afterwards."""
    folder = tmp_path_factory.mktemp("toy-model")
    torch.manual_seed(0)
    save_file(ToyDiT(ToyDiTConfig()).state_dict(), str(folder / DIT_FILE))
    register_spec(TOY_SPEC)
    descriptor = register_family(toy_descriptor(folder))
    try:
        yield descriptor
    finally:
        unregister_family(FAMILY_ID)
        unregister_spec(TOY_SPEC.name)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("toy-data")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a toy square {i}", encoding="utf-8")
    return folder


def run_main(capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- tests
def test_the_toy_family_passes_the_family_contract(toy_family, tmp_path):
    contract.test_descriptor_is_complete(toy_family)
    contract.test_detection_specs_belong_to_the_family(toy_family)
    contract.test_pipeline_imports_and_is_the_familys(toy_family)
    contract.test_training_adapter_imports_and_is_the_familys(toy_family)
    preset = toy_family.presets[PRESET]
    contract.test_lora_names_round_trip(toy_family, preset)
    contract.test_lora_signs_do_not_claim_other_families_layers(toy_family, preset)
    contract.test_a_tiny_saved_dit_routes_to_the_familys_pipeline(toy_family, preset, tmp_path / "routing")
    contract.test_diffusers_folders_route_by_class_name(toy_family, tmp_path / "diffusers")


def test_models_list_shows_the_toy_preset(toy_family, capsys):
    code, out, err = run_main(capsys, "models", "list", "--family", FAMILY_ID)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()]
    row = next(row for row in rows if row and row[0] == PRESET)
    assert row[1:3] == [FAMILY_ID, "image"]
    assert row[3] != "?", f"the toy preset is listed without its size: {row}"


def test_generate_from_the_toy_preset(toy_family, tmp_path, capsys):
    output = tmp_path / "toy.png"
    args = ("generate", "--model", PRESET, "--prompt", "a toy", "-o", output, "--device", "cpu", "--quiet")
    code, out, err = run_main(capsys, *args, "--seed", "3")
    assert code == 0, err
    assert out.strip() == str(output)
    with Image.open(output) as image:
        assert image.size == (32, 32)  # the preset's sampling defaults
        parameters = json.loads(image.info["diffsynth"])
        pixels = np.asarray(image)
    assert parameters["steps"] == 4 and parameters["seed"] == 3 and parameters["model"] == PRESET
    assert pixels.std() > 1, "a blank image"


def test_train_a_lora_on_the_toy_preset_and_generate_with_it(toy_family, captioned, tmp_path, capsys):
    output = tmp_path / "run"
    args = ("train", "lora", "--model", PRESET, "--data", captioned, "--output", output, "--steps", "3")
    small = ("--height", "32", "--width", "32", "--mixed-precision", "no", "--device", "cpu", "--no-progress")
    code, out, err = run_main(capsys, *args, *small, "--rank", "4", "--learning-rate", "1e-2")
    assert code == 0, err
    lora = Path(out.strip())
    assert lora == output / "lora.safetensors"
    with safe_open(lora, "pt") as file:
        layers = {re.sub(r"\.(lora_\w+|alpha).*$", "", key) for key in file.keys()}  # noqa: SIM118
    trained = {_OURS.search(layer).group(0) for layer in layers if _OURS.search(layer)}
    assert trained == {f"layers.{i}.{name}" for i in range(2) for name in ("qkv", "proj", "mlp_in", "mlp_out")}

    plain, styled = tmp_path / "plain.png", tmp_path / "styled.png"
    common = ("generate", "--model", PRESET, "--prompt", "a toy", "--device", "cpu", "--quiet", "--seed", "1")
    assert run_main(capsys, *common, "-o", plain)[0] == 0
    code, _, err = run_main(capsys, *common, "-o", styled, "--lora", f"{lora}:1.0")
    assert code == 0, err
    with Image.open(plain) as first, Image.open(styled) as second:
        assert not np.array_equal(np.asarray(first), np.asarray(second)), "the trained LoRA changes nothing"


def test_the_toy_family_is_gone_after_unregistering(toy_family):
    from ds_loader import list_families

    assert FAMILY_ID in {family.id for family in list_families()}
    descriptor = toy_family
    unregister_family(FAMILY_ID)
    try:
        assert FAMILY_ID not in {family.id for family in list_families()}
        with pytest.raises(ValueError, match="toy-tiny"):
            from ds_pipelines import family_for

            family_for(PRESET)
    finally:
        register_family(descriptor)


def test_a_trained_toy_lora_converts_to_diffusers_and_back(toy_family, captioned, tmp_path, capsys):
    """lora_io reads the family's LoRA naming: the family is told from the layer names, the diffusers file uses the
    family's diffusers module names, and it loads back into the pipeline with the same effect."""
    output = tmp_path / "run"
    args = ("train", "lora", "--model", PRESET, "--data", captioned, "--output", output, "--steps", "2")
    small = ("--height", "32", "--width", "32", "--mixed-precision", "no", "--device", "cpu", "--no-progress")
    code, out, err = run_main(capsys, *args, *small, "--rank", "2", "--learning-rate", "1e-2")
    assert code == 0, err
    comfyui = Path(out.strip())
    diffusers = tmp_path / "toy-diffusers.safetensors"
    code, out, err = run_main(capsys, "lora", "convert", comfyui, "--to", "diffusers", "-o", diffusers)
    assert code == 0, err
    with safe_open(diffusers, "pt") as file:
        keys = list(file.keys())
    assert keys and all(re.match(r"transformer\.toy_blocks\.\d+\.to_\w+\.lora_[AB]\.weight$", key) for key in keys)

    images = []
    for lora in (comfyui, diffusers):
        image = tmp_path / f"{lora.stem}.png"
        common = ("generate", "--model", PRESET, "--prompt", "a toy", "--device", "cpu", "--quiet", "--seed", "1")
        code, _, err = run_main(capsys, *common, "-o", image, "--lora", lora)
        assert code == 0, err
        with Image.open(image) as opened:
            images.append(np.asarray(opened).astype(int))
    assert np.abs(images[0] - images[1]).max() <= 1
