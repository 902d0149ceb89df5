"""FLUX.1 text-to-image, image-to-image, Kontext editing and Fill inpainting, as the official sampler runs them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from ds_loader.families import Preset
from ds_models_core import grid_positions, patchify, unpatchify
from ds_vram import VRAMConfig

from .base import Pipeline, pipeline_step
from .media import image_to_tensor, tensor_to_images
from .schedulers import FlowMatchScheduler

__all__ = ["FluxImagePipeline"]

LATENT_CHANNELS = 16
PIXELS_PER_TOKEN = 16  # 8x VAE downsampling, then 2x2 patches


@dataclass
class PromptEmbedding:
    text: torch.Tensor  # (B, S, 4096) T5 hidden states
    pooled: torch.Tensor  # (B, 768) CLIP pooled output


def check_size(height: int, width: int) -> None:
    """FLUX.1 needs multiples of 16 pixels; say which sizes are nearest instead of silently rounding."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < PIXELS_PER_TOKEN:
            raise ValueError(f"{name}={value!r} must be an integer of at least {PIXELS_PER_TOKEN}")
        if value % PIXELS_PER_TOKEN:
            lower = value // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
            raise ValueError(
                f"{name}={value} is not a multiple of {PIXELS_PER_TOKEN}; the nearest valid sizes are "
                f"{max(lower, PIXELS_PER_TOKEN)} and {lower + PIXELS_PER_TOKEN}"
            )


class FluxImagePipeline(Pipeline):
    """FLUX.1 dev / schnell / Krea-dev / Kontext-dev / Fill-dev.

    Components: ``tokenizer`` + ``text_encoder`` (CLIP, pooled), ``tokenizer_2`` + ``text_encoder_2`` (T5),
    ``dit`` (``FluxDiT``), ``vae`` (``FluxVAE``).
    """

    component_names = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "dit", "vae")

    default_options: ClassVar[Mapping[str, object]] = {
        "cfg_scale": 1.0,
        "embedded_guidance": 3.5,
        "height": 1024,
        "width": 1024,
        "num_inference_steps": 30,
    }

    # ------------------------------------------------------------------ loading (the base from_pretrained calls these)
    family = "flux.1"
    required_components = component_names
    folder_layout = (
        "the DiT (flux1-*.safetensors or transformer/), the VAE (ae.safetensors or vae/), text_encoder/, "
        "text_encoder_2/, tokenizer/ and tokenizer_2/"
    )

    @classmethod
    def folder_sources(cls, folder: Path) -> dict[str, object]:
        """BFL files at the root (``flux1-*.safetensors``, ``ae.safetensors``) or diffusers folders."""
        sources: dict[str, object] = {}
        bfl_dits = sorted(folder.glob("flux1-*.safetensors"))
        if bfl_dits:
            sources["dit"] = bfl_dits[0]
        elif (folder / "transformer").is_dir():
            sources["dit"] = folder / "transformer"
        if (folder / "ae.safetensors").is_file():
            sources["vae"] = folder / "ae.safetensors"
        elif (folder / "vae").is_dir():
            sources["vae"] = folder / "vae"
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if (folder / name).is_dir():
                sources[name] = folder / name
        return sources

    @classmethod
    def tokenizer_name(cls, folder: Path) -> str | None:
        return folder.name if folder.name in ("tokenizer", "tokenizer_2") else None

    @classmethod
    def load_components(
        cls,
        sources: Mapping[str, object],
        *,
        device: torch.device,
        torch_dtype: torch.dtype,
        vram: VRAMConfig | Mapping[str, VRAMConfig] | None,
    ) -> dict[str, object]:
        from ds_models_flux import CLIP_SPEC, DIT_SPEC, T5_SPEC, VAE_SPEC, load_tokenizers

        specs = {"dit": DIT_SPEC, "vae": VAE_SPEC, "text_encoder": CLIP_SPEC, "text_encoder_2": T5_SPEC}
        components: dict[str, object] = cls.load_models(
            sources, specs, required=cls.component_names, device=device, torch_dtype=torch_dtype, vram=vram
        )
        components["tokenizer"], components["tokenizer_2"] = load_tokenizers(
            _tokenizer_root(sources["tokenizer"], sources["tokenizer_2"])
        )
        return components

    # ------------------------------------------------------------------ the DiT call
    @staticmethod
    def predict(
        model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, conditions: Mapping[str, object]
    ) -> torch.Tensor:
        """FLUX.1's velocity for unpacked latents (B, 16, H, W) at ``sigmas`` (B,), the one DiT call of sampling
        and training. conditions: ``text`` (B, S, 4096) T5 states, ``pooled`` (B, 768) CLIP output, and optionally
        ``guidance`` (B,) (guidance-distilled models), ``fill`` (B, C, H, W) Fill-dev channels joined to the
        latents, ``reference_tokens``/``reference_ids`` (Kontext). Returns (B, 16, H, W)."""
        batch, _, height, width = latents.shape
        device = latents.device
        fill = conditions.get("fill")
        model_input = latents if fill is None else torch.cat([latents, fill.to(latents.dtype)], dim=1)
        image_ids = grid_positions((1, height // 2, width // 2), device=device)[None].expand(batch, -1, -1)
        text = conditions["text"]
        text_ids = torch.zeros(batch, text.shape[1], 3, device=device)
        velocity = model(
            patchify(model_input),
            image_ids,
            text,
            text_ids,
            sigmas.to(device, latents.dtype),
            conditions["pooled"],
            conditions.get("guidance"),
            ref_tokens=conditions.get("reference_tokens"),
            ref_ids=conditions.get("reference_ids"),
        )
        return unpatchify(velocity, (height, width))

    @classmethod
    def run_component(
        cls,
        name: str,
        module: torch.nn.Module,
        *,
        height: int,
        width: int,
        frames: int,
        device: torch.device,
        preset: Preset | None,
    ) -> object:
        """See ``Pipeline.run_component``. CLIP on its 77 tokens, T5 on the preset's ``t5_sequence_length``, one DiT
        prediction through ``predict`` (with Fill-dev's extra channels; no Kontext reference), an untiled decode."""
        t5_tokens = getattr(preset, "t5_sequence_length", 512)

        def noise(*shape: int) -> torch.Tensor:
            return torch.randn(1, *shape, device=device, dtype=torch.bfloat16)

        if name in ("text_encoder", "text_encoder_2"):
            length = module.config.max_position_embeddings if name == "text_encoder" else t5_tokens
            return module(input_ids=torch.randint(0, module.config.vocab_size, (1, length), device=device))
        if name == "dit":
            config = module.config
            size = (height * 2 // PIXELS_PER_TOKEN, width * 2 // PIXELS_PER_TOKEN)  # latents: 8 pixels each
            fill_channels = (config.in_channels - config.out_channels) // 4  # Fill-dev: masked image and mask
            sigmas = torch.full((1,), 0.5, device=device, dtype=torch.bfloat16)
            conditions = {
                "text": noise(t5_tokens, config.context_in_dim),
                "pooled": noise(config.vec_in_dim),
                "guidance": torch.full_like(sigmas, 3.5) if config.guidance_embed else None,
                "fill": noise(fill_channels, *size) if fill_channels else None,
            }
            return cls.predict(module, noise(config.out_channels // 4, *size), sigmas, conditions)
        if name == "vae":
            scale = module.spatial_compression
            return module.decode(noise(module.latent_channels, height // scale, width // scale))
        raise ValueError(f"{cls.__name__} has no model component {name!r}")

    def default_t5_sequence_length(self) -> int:
        """T5 tokens per prompt when none is asked for: 512 for guidance-distilled (dev-family) models, 256 for
        schnell, but never more than ``tokenizer_2.model_max_length`` (512 in the releases; a small model such as
        ``demo-digits`` declares the length it was trained with there, so training and sampling agree)."""
        dit = self._components.get("dit")  # read, not run: no step needs to declare it for this
        length = 512 if dit is None or dit.config.guidance_embed else 256
        declared = getattr(self._components.get("tokenizer_2"), "model_max_length", None)
        return min(length, declared) if isinstance(declared, int) and declared > 0 else length

    @pipeline_step("text_encoder", "text_encoder_2")
    def encode_prompt(self, prompt: str | list[str], t5_sequence_length: int | None = None) -> PromptEmbedding:
        """T5 hidden states and CLIP pooled output; ``t5_sequence_length`` None: ``default_t5_sequence_length()``."""
        from ds_models_flux import FluxTextEncoders

        if t5_sequence_length is None:
            t5_sequence_length = self.default_t5_sequence_length()
        encoders = FluxTextEncoders(self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2)
        text, pooled = encoders.encode_prompt(prompt, t5_sequence_length)
        return PromptEmbedding(text.to(self.device, self.torch_dtype), pooled.to(self.device, self.torch_dtype))

    @pipeline_step("vae")
    def encode_image(
        self, image: Image.Image | torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_overlap: int = 16
    ) -> torch.Tensor:
        """Image (PIL, or (B, 3, H, W) in [-1, 1]) to scaled latents (B, 16, H/8, W/8)."""
        pixels = image if isinstance(image, torch.Tensor) else image_to_tensor(image)
        pixels = pixels.to(self.device, self.torch_dtype)
        tiles = dict(tile_size=tile_size, tile_overlap=tile_overlap) if tiled else {}
        return self.vae.encode(pixels, **tiles)

    @pipeline_step("dit")
    def denoise(
        self,
        latents: torch.Tensor,
        prompt: PromptEmbedding,
        negative: PromptEmbedding | None,
        scheduler: FlowMatchScheduler,
        cfg_scale: float,
        embedded_guidance: float | None,
        references: list[torch.Tensor],
        fill_condition: torch.Tensor | None,
    ) -> torch.Tensor:
        """Run the sampler from ``latents`` (B, 16, h, w) at ``scheduler.sigmas[0]`` down to sigma 0."""
        batch = latents.shape[0]
        ref_tokens, ref_ids = self._reference_tokens(references, batch)
        guidance = None
        if self.dit.config.guidance_embed and embedded_guidance is not None:
            guidance = torch.full((batch,), embedded_guidance, device=self.device, dtype=self.torch_dtype)
        shared = {
            "guidance": guidance,
            "fill": fill_condition,
            "reference_tokens": ref_tokens,
            "reference_ids": ref_ids,
        }
        conditional = {"text": prompt.text, "pooled": prompt.pooled, **shared}
        unconditional = None if negative is None else {"text": negative.text, "pooled": negative.pooled, **shared}
        steps = scheduler.timesteps
        for index, sigma in enumerate(self.progress(steps, desc="denoising")):
            sigmas = torch.full((batch,), float(sigma), device=self.device, dtype=self.torch_dtype)
            prediction = self.predict(self.dit, latents, sigmas, conditional)
            if unconditional is not None:
                baseline = self.predict(self.dit, latents, sigmas, unconditional)
                prediction = baseline + cfg_scale * (prediction - baseline)
            latents = scheduler.step(prediction, index, latents)
            self.check_finite(latents, index, len(steps))
        return latents

    @pipeline_step("vae")
    def decode(
        self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_overlap: int = 16
    ) -> torch.Tensor:
        tiles = dict(tile_size=tile_size, tile_overlap=tile_overlap) if tiled else {}
        return self.vae.decode(latents.to(self.torch_dtype), **tiles)

    # ------------------------------------------------------------------ helpers
    def _reference_tokens(
        self, references: list[torch.Tensor], batch: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Kontext reference latents as tokens, with ids (1, row, col): the official image index 1."""
        if not references:
            return None, None
        tokens, ids = [], []
        for latents in references:
            tokens.append(patchify(latents).expand(batch, -1, -1))
            grid = grid_positions(
                (1, latents.shape[2] // 2, latents.shape[3] // 2), start=(1, 0, 0), device=self.device
            )
            ids.append(grid[None].expand(batch, -1, -1))
        return torch.cat(tokens, dim=1), torch.cat(ids, dim=1)

    def _fill_condition(
        self, image: Image.Image, mask: Image.Image, height: int, width: int, tiled: bool, batch: int
    ) -> torch.Tensor:
        """Fill-dev's extra channels: the masked image's latents and the mask folded to latent resolution."""
        for name, item in (("fill_image", image), ("fill_mask", mask)):
            if item.size != (width, height):
                raise ValueError(
                    f"{name} is {item.size[0]}x{item.size[1]}; it must match width x height {width}x{height}"
                )
        pixels = image_to_tensor(image)
        mask_tensor = image_to_tensor(mask.convert("L").convert("RGB"))[:, :1].add(1).div(2)  # 1 = repaint
        mask_tensor = (mask_tensor > 0.5).float()
        latents = self.encode_image(pixels * (1 - mask_tensor), tiled=tiled)
        # Each 8x8 pixel block of the mask becomes 64 channels at latent resolution, as BFL's prepare_fill does.
        batch_size, _, pixel_height, pixel_width = mask_tensor.shape
        folded = mask_tensor.view(batch_size, 1, pixel_height // 8, 8, pixel_width // 8, 8)
        folded = folded.permute(0, 1, 3, 5, 2, 4).reshape(batch_size, 64, pixel_height // 8, pixel_width // 8)
        condition = torch.cat([latents, folded.to(self.device, self.torch_dtype)], dim=1)  # joined before patching
        return condition.expand(batch, -1, -1, -1)

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        cfg_scale: float | None = None,
        embedded_guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        rand_device: str = "cpu",
        input_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        sigma_shift: float | None = None,
        kontext_images: list[Image.Image] | Image.Image | None = None,
        fill_image: Image.Image | None = None,
        fill_mask: Image.Image | None = None,
        t5_sequence_length: int | None = None,
        tiled: bool = False,
        tile_size: int = 64,
        tile_overlap: int = 16,
    ) -> Image.Image:
        """Generate one image. Sizes are pixels (multiples of 16); tile sizes are latents (8 pixels each).

        Options left as None take the loaded preset's values (``pipe.sampling_defaults``: e.g. 32x32, 12 steps and
        cfg 2 for demo-digits, 4 steps for schnell), otherwise cfg 1, embedded guidance 3.5, 1024x1024, 30 steps.
        """
        cfg_scale, embedded_guidance, height, width, num_inference_steps = self.sampling_options(
            cfg_scale=cfg_scale,
            embedded_guidance=embedded_guidance,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
        ).values()
        check_size(height, width)
        if denoising_strength != 1.0 and input_image is None:
            raise ValueError("denoising_strength != 1 needs an input_image to start from; pass input_image=...")
        if (fill_image is None) != (fill_mask is None):
            raise ValueError("Fill needs both fill_image and fill_mask")
        is_fill_model = self.dit.config.in_channels > LATENT_CHANNELS * 4
        if (fill_image is not None) != is_fill_model:
            raise ValueError(
                "fill_image and fill_mask go with a FLUX.1-Fill model (384 input channels), and it needs them; "
                f"this DiT takes {self.dit.config.in_channels} channels"
            )
        self.require(*self.component_names)
        shape = (1, LATENT_CHANNELS, height // 8, width // 8)
        if noise is None:
            noise = self.generate_noise(shape, seed, rand_device=rand_device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; {height}x{width} needs {shape}")
        noise = noise.to(self.device, self.torch_dtype)

        distilled_guidance = self.dit.config.guidance_embed  # dev-style models; schnell has no guidance embedding
        if t5_sequence_length is None:
            t5_sequence_length = self.default_t5_sequence_length()
        template = "flux.1" if distilled_guidance else "flux.1-schnell"
        scheduler = FlowMatchScheduler(template)
        sequence_length = (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)
        scheduler.set_timesteps(
            num_inference_steps,
            denoising_strength=denoising_strength,
            image_sequence_length=sequence_length,
            sigma_shift=sigma_shift,
        )

        positive = self.encode_prompt(prompt, t5_sequence_length)
        negative = self.encode_prompt(negative_prompt, t5_sequence_length) if cfg_scale != 1.0 else None

        latents = noise
        if input_image is not None:
            start = self.encode_image(input_image.resize((width, height)), tiled, tile_size, tile_overlap)
            latents = FlowMatchScheduler.add_noise(start, noise, scheduler.sigmas[0])
        if isinstance(kontext_images, Image.Image):
            kontext_images = [kontext_images]
        references = [self.encode_image(_fit(image), tiled, tile_size, tile_overlap) for image in kontext_images or []]
        fill_condition = None
        if fill_image is not None:
            fill_condition = self._fill_condition(fill_image, fill_mask, height, width, tiled, 1)

        latents = self.denoise(
            latents, positive, negative, scheduler, cfg_scale, embedded_guidance, references, fill_condition
        )
        pixels = self.decode(latents, tiled, tile_size, tile_overlap)
        self.load_models_to_device(())
        image = tensor_to_images(pixels)[0]
        image.info["diffsynth"] = json.dumps(
            {
                "prompt": prompt,
                "negative_prompt": negative_prompt or None,
                "seed": seed,
                "steps": num_inference_steps,
                "cfg_scale": cfg_scale,
                "embedded_guidance": embedded_guidance if self.dit.config.guidance_embed else None,
                "size": f"{width}x{height}",
                "denoising_strength": denoising_strength if input_image else None,
                "sigma_shift": sigma_shift,
                "model": getattr(self, "model_name", None),
            }
        )
        return image


def _tokenizer_root(clip: object, t5: object) -> Path:
    """The folder holding ``tokenizer/`` and ``tokenizer_2/`` (resolving ModelConfigs, which may download)."""
    from ds_loader import ModelConfig

    folders = []
    for source in (clip, t5):
        paths = source.resolve() if isinstance(source, ModelConfig) else [Path(source)]
        first = Path(paths[0])
        folders.append(first if first.is_dir() else first.parent)
    if folders[0].parent != folders[1].parent:
        raise ValueError(f"tokenizer folders {folders[0]} and {folders[1]} must sit in one model folder")
    return folders[0].parent


def _fit(image: Image.Image) -> Image.Image:
    """Kontext references keep their size, cropped down to a multiple of 16 pixels."""
    width = image.width // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
    height = image.height // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
    if (width, height) == image.size:
        return image
    return image.crop((0, 0, width, height))
