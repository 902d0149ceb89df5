"""Z-Image (Turbo, base, Omni-Base) text-to-image, image-to-image and Omni-Base editing from reference images,
sampled as diffusers' and the official ZImagePipeline (and ZImageOmniPipeline) do.

The DiT is called at the model's own time ``t = 1 - sigma`` (1 is clean, where flow-matching sigma 0 is) and its
output is the negative of the flow velocity; ``predict`` hides both, so sampling and training see the usual
velocity ``noise - x0`` at sigma. ``cfg_scale`` is the usual scale ``neg + s * (pos - neg)``, off at 1; diffusers'
``guidance_scale`` for Z-Image is ``s - 1``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image

from ds_loader.families import Preset
from ds_vram import VRAMConfig, get_vram_handle

from .base import Pipeline, pipeline_step, source_folder, subfolder_sources, unwrap_model
from .controlnet import ControlNetInput, as_controlnet_inputs
from .flux_image import check_size
from .media import image_to_tensor, metadata_json, tensor_to_images
from .schedulers import FlowMatchScheduler

__all__ = ["ZImagePipeline"]

LATENT_CHANNELS = 16
MAX_PROMPT_TOKENS = 512  # the official text length; longer prompts are an error, not silently cut


@dataclass
class PromptEmbedding:
    text: torch.Tensor  # (B, L, 2560) second-to-last Qwen3 hidden states of the chat-templated prompt
    mask: torch.Tensor  # (B, L) bool, True on the prompt's tokens


@dataclass
class OmniPrompt:
    """An Omni-Base prompt for ``N`` reference images: the Qwen3 states (valid tokens) of each segment of the omni
    template, ``N + 2`` of them (one per reference, then the target's two)."""

    segments: list[torch.Tensor]


@dataclass
class References:
    """Omni-Base reference images: clean VAE latents ``(16, h, w)`` and SigLIP2 grids ``(rows, cols, C)``."""

    latents: list[torch.Tensor]
    siglip: list[torch.Tensor]


EDIT_MAX_AREA = 1024 * 1024  # a larger reference is resized to this area (or the requested size's), as diffusers does
EDIT_MULTIPLE = 16  # references are centre-cropped to a multiple of 16 pixels for the VAE


def omni_prompt_segments(prompt: str, num_images: int) -> list[str]:
    """diffusers' omni prompt template for ``num_images`` reference images: one segment up to each reference's
    ``<|vision_start|>``, the prompt's segment up to the target's, and the closing one; without references the
    plain user turn."""
    if num_images == 0:
        return ["<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n"]
    segments = ["<|im_start|>user\n<|vision_start|>"]
    segments += ["<|vision_end|><|vision_start|>"] * (num_images - 1)
    segments += ["<|vision_end|>" + prompt + "<|im_end|>\n<|im_start|>assistant\n<|vision_start|>"]
    segments += ["<|vision_end|><|im_end|>"]
    return segments


def prepare_reference(image: Image.Image, height: int | None, width: int | None) -> tuple[Image.Image, Image.Image]:
    """(the image SigLIP2 sees, the image the VAE encodes): over 1024² pixels (or the requested area) an image is
    resized to that area (LANCZOS), then the VAE's copy is centre-cropped to a multiple of 16, as diffusers'
    ZImageOmniPipeline prepares its condition images."""
    image = image.convert("RGB")
    w, h = image.size
    if w * h > EDIT_MAX_AREA:
        target = height * width if height is not None and width is not None else EDIT_MAX_AREA
        scale = math.sqrt(target / (w * h))
        image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
        w, h = image.size
    cw, ch = w // EDIT_MULTIPLE * EDIT_MULTIPLE, h // EDIT_MULTIPLE * EDIT_MULTIPLE
    if cw == 0 or ch == 0:
        raise ValueError(f"edit_image of {w}x{h} pixels is smaller than {EDIT_MULTIPLE}x{EDIT_MULTIPLE}")
    left, top = (w - cw) // 2, (h - ch) // 2
    return image, image.crop((left, top, left + cw, top + ch))


@functools.cache
def warn_fp8_turbo() -> None:
    """Once per process: Turbo's few-step distillation does not survive FP8 weights well."""
    warnings.warn(
        "Z-Image-Turbo with FP8 weight storage for the DiT degrades image quality noticeably (the few-step "
        "distilled model is sensitive to weight precision); store the DiT in bfloat16 and offload it to the CPU "
        "(VRAMConfig(storage='cpu') or storage='disk') to save memory instead. Continuing with FP8, as asked.",
        UserWarning,
        stacklevel=3,
    )


def guide(
    positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float, normalization: float | bool
) -> torch.Tensor:
    """Classifier-free guidance ``neg + cfg_scale * (pos - neg)`` in float32; with ``normalization`` > 0 the result's
    norm (per sample) is capped at the positive prediction's norm times ``normalization`` (diffusers' Z-Image
    ``cfg_normalization``; True means a factor of 1)."""
    positive, negative = positive.float(), negative.float()
    guided = negative + cfg_scale * (positive - negative)
    factor = float(normalization)
    if factor > 0:
        dims = tuple(range(1, guided.dim()))
        norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
        limit = torch.linalg.vector_norm(positive, dim=dims, keepdim=True) * factor
        guided = torch.where(norm > limit, guided * (limit / norm), guided)
    return guided


def cfg_active(sigma: float, cfg_truncation: float) -> bool:
    """Whether CFG runs at a step of noise level ``sigma``: diffusers turns it off once the normalised time
    ``(1000 - 1000 sigma) / 1000`` (computed as it does, in float32) passes ``cfg_truncation``; a truncation above 1
    never does."""
    if cfg_truncation > 1:
        return True
    timestep = torch.tensor(sigma, dtype=torch.float32) * 1000
    return float((1000 - timestep) / 1000) <= cfg_truncation


class ZImagePipeline(Pipeline):
    """Z-Image-Turbo and Z-Image (base).

    Components: ``tokenizer`` + ``text_encoder`` (Qwen3, chat-templated prompts), ``dit`` (``ZImageDiT``), ``vae``
    (the FLUX.1 VAE of ds-models-flux, read from the release's diffusers ``AutoencoderKL`` file), and optionally
    ``controlnet`` (``ZImageControlNet``, the Fun ControlNet Union; load it with ``model_configs``).
    """

    component_names = ("tokenizer", "text_encoder", "dit", "vae", "controlnet", "image_encoder")
    # Turbo, the main release: 8 steps without CFG. Presets override (base: 50 steps, cfg 4).
    default_options: ClassVar[Mapping[str, object]] = {
        "cfg_scale": 1.0,
        "height": 1024,
        "width": 1024,
        "num_inference_steps": 8,
        "sigma_shift": 3.0,
    }

    # ------------------------------------------------------------------ loading (the base from_pretrained calls these)
    family = "z-image"
    required_components = ("tokenizer", "text_encoder", "dit", "vae")
    folder_layout = "transformer/, text_encoder/, tokenizer/ and vae/ (the diffusers layout Tongyi-MAI releases)"

    @classmethod
    def folder_sources(cls, folder: Path) -> dict[str, object]:
        """Tongyi-MAI's repositories are diffusers folders: ``transformer/``, ``text_encoder/``, ``vae/``,
        ``tokenizer/``."""
        return subfolder_sources(
            folder,
            {
                "transformer": "dit",
                "text_encoder": "text_encoder",
                "vae": "vae",
                "tokenizer": "tokenizer",
                "siglip": "image_encoder",
            },
        )

    @classmethod
    def load_components(
        cls,
        sources: Mapping[str, object],
        *,
        device: torch.device,
        torch_dtype: torch.dtype,
        vram: VRAMConfig | Mapping[str, VRAMConfig] | None,
    ) -> dict[str, object]:
        from transformers import AutoTokenizer

        from ds_models_flux import VAE_SPEC
        from ds_models_z_image import CONTROLNET_SPEC, DIT_SPEC, IMAGE_ENCODER_SPEC, TEXT_ENCODER_SPEC

        specs = {
            "dit": DIT_SPEC,
            "vae": VAE_SPEC,
            "text_encoder": TEXT_ENCODER_SPEC,
            "controlnet": CONTROLNET_SPEC,
            "image_encoder": IMAGE_ENCODER_SPEC,
        }
        components: dict[str, object] = cls.load_models(
            sources, specs, required=cls.required_components, device=device, torch_dtype=torch_dtype, vram=vram
        )
        components["tokenizer"] = AutoTokenizer.from_pretrained(source_folder(sources["tokenizer"]))
        return components

    def configure(self, preset: Preset | None) -> None:
        dit = self._components.get("dit")
        handle = get_vram_handle(dit) if dit is not None else None
        stored = getattr(handle.config, "storage_dtype", None) if handle is not None else None
        fp8 = isinstance(stored, torch.dtype) and stored.itemsize == 1
        name = preset.name if preset is not None else str(self.model_name or "")
        if fp8 and "turbo" in name.lower():
            warn_fp8_turbo()

    # ------------------------------------------------------------------ the DiT call
    @staticmethod
    def predict(
        model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, conditions: Mapping[str, object]
    ) -> torch.Tensor:
        """Z-Image's flow velocity for latents (B, 16, H, W) at ``sigmas`` (B,), the one DiT call of sampling and
        training. conditions: ``text`` (B, L, 2560) prompt states, ``text_mask`` (B, L) bool (None: all tokens), and
        optionally ``controlnet_hints`` and ``controlnet_refiner_hints``. The DiT runs at its own time ``1 - sigma``
        and predicts ``x0 - noise``, so its output is negated. Returns (B, 16, H, W) in the DiT's dtype."""
        timestep = (1 - sigmas.float()).to(latents.device)
        if "reference_latents" in conditions:  # Omni-Base: caption segments, clean references, SigLIP2 features
            output = model(
                latents,
                timestep,
                conditions["text"],
                reference_latents=conditions["reference_latents"],
                siglip_features=conditions.get("siglip_features"),
            )
            return -output
        mask = conditions.get("text_mask")
        if mask is not None and mask.dtype != torch.bool:  # a batch cast to the training dtype carries it as 0/1
            mask = mask > 0.5
        output = model(
            latents,
            timestep,
            conditions["text"],
            mask,
            controlnet_hints=conditions.get("controlnet_hints"),
            controlnet_refiner_hints=conditions.get("controlnet_refiner_hints"),
        )
        return -output

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
        """See ``Pipeline.run_component``. Qwen3 on a full 512-token prompt, one DiT prediction through ``predict``
        with 512 caption tokens, an untiled decode."""

        def noise(*shape: int) -> torch.Tensor:
            return torch.randn(1, *shape, device=device, dtype=torch.bfloat16)

        if name == "text_encoder":
            ids = torch.randint(0, module.config.vocab_size, (1, MAX_PROMPT_TOKENS), device=device)
            return module(input_ids=ids, output_hidden_states=True).hidden_states[-2]
        if name == "dit":
            config = unwrap_model(module).config
            scale = 8
            conditions = {
                "text": noise(MAX_PROMPT_TOKENS, config.cap_feat_dim),
                "text_mask": torch.ones(1, MAX_PROMPT_TOKENS, dtype=torch.bool, device=device),
            }
            sigmas = torch.full((1,), 0.5, device=device)
            return cls.predict(module, noise(LATENT_CHANNELS, height // scale, width // scale), sigmas, conditions)
        if name == "image_encoder":  # Omni-Base's SigLIP2 on a full 256-patch image
            config = module.config
            side = math.isqrt(config.num_patches)
            pixels = noise(side * side, config.num_channels * config.patch_size**2)
            return module(
                pixel_values=pixels,
                pixel_attention_mask=torch.ones(1, side * side, dtype=torch.long, device=device),
                spatial_shapes=torch.tensor([[side, side]], device=device),
            ).last_hidden_state
        if name == "vae":
            scale = module.spatial_compression
            return module.decode(noise(module.latent_channels, height // scale, width // scale))
        raise ValueError(f"{cls.__name__} has no model component {name!r}")

    # ------------------------------------------------------------------ steps
    @pipeline_step("text_encoder")
    def encode_prompt(self, prompt: str | list[str]) -> PromptEmbedding:
        """Second-to-last Qwen3 hidden states of the chat-templated prompt(s) and their token mask; a prompt over
        512 tokens is a ValueError (the official pipeline would cut it silently)."""
        from ds_models_z_image.text_encoder import encode_prompt

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # On the pipeline's device: a managed encoder's parameters may sit in CPU RAM or, unread, on disk.
        text, mask = encode_prompt(
            self.text_encoder, self.tokenizer, prompts, max_length=MAX_PROMPT_TOKENS, device=self.device
        )
        return PromptEmbedding(text.to(self.device, self.torch_dtype), mask.to(self.device))

    @pipeline_step("text_encoder")
    def encode_omni_prompt(self, prompt: str, num_images: int) -> OmniPrompt:
        """The omni template's segments for ``num_images`` references, each encoded alone (second-to-last Qwen3
        hidden states, valid tokens); a segment over 512 tokens is a ValueError."""
        from ds_models_z_image.text_encoder import PromptTooLongError

        segments = []
        for index, text in enumerate(omni_prompt_segments(prompt, num_images)):
            ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] > MAX_PROMPT_TOKENS:
                raise PromptTooLongError(
                    f"omni prompt segment {index} is {ids.shape[1]} tokens; Z-Image reads at most {MAX_PROMPT_TOKENS}"
                )
            ids = ids.to(self.device)
            mask = torch.ones_like(ids, dtype=torch.bool)
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            segments.append(hidden[-2][0].to(self.device, self.torch_dtype))
        return OmniPrompt(segments)

    @pipeline_step("vae", "image_encoder")
    def encode_references(self, images: list[Image.Image], height: int | None, width: int | None) -> References:
        """Clean VAE latents and SigLIP2 features of each reference image (see ``prepare_reference``)."""
        from ds_models_z_image.image_encoder import encode_reference, image_processor

        encoder = self.image_encoder
        processor = image_processor(max_num_patches=unwrap_model(encoder).config.num_patches)
        latents, siglip = [], []
        for image in images:
            seen, cropped = prepare_reference(image, height, width)
            pixels = image_to_tensor(cropped).to(self.device, self.torch_dtype)
            latents.append(self.vae.encode(pixels)[0].to(self.torch_dtype))
            siglip.append(encode_reference(encoder, processor, seen, self.device).to(self.torch_dtype))
        return References(latents, siglip)

    @pipeline_step("vae")
    def encode_image(
        self, image: Image.Image | torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_overlap: int = 16
    ) -> torch.Tensor:
        """Image (PIL, or (B, 3, H, W) in [-1, 1]) to scaled latents (B, 16, H/8, W/8)."""
        pixels = image if isinstance(image, torch.Tensor) else image_to_tensor(image)
        pixels = pixels.to(self.device, self.torch_dtype)
        tiles = dict(tile_size=tile_size, tile_overlap=tile_overlap) if tiled else {}
        return self.vae.encode(pixels, **tiles)

    @pipeline_step("vae")
    def encode_control(
        self, control: ControlNetInput, height: int, width: int, tiled: bool = False, **tiles: int
    ) -> torch.Tensor:
        """The ControlNet's input latents for one ``ControlNetInput``, (1, control_in_dim, height/8, width/8).

        As VideoX-Fun's Z-Image control pipeline: the control image's latents (zeros for ``control_type="inpaint"``,
        whose image is the picture to repaint), then for the 2.x models (33 channels) the mask at latent size as
        ``1 - mask`` (nearest, 0 = repaint) and the latents of the picture with the masked part set to 0. Without a
        mask the mask channel is 0 and the picture is all zeros (mid-gray), as the official text-to-image example
        feeds it (diffusers' ZImageControlNetPipeline feeds zero latents instead).
        """
        channels = unwrap_model(self._components["controlnet"]).config.control_in_dim
        encode = functools.partial(self._encode_pixels, tiled=tiled, **tiles)
        size = (height // 8, width // 8)
        if control.control_type == "inpaint":
            latents = torch.zeros(1, LATENT_CHANNELS, *size, device=self.device, dtype=self.torch_dtype)
        else:
            latents = encode(control.image_tensor(height, width))
        if channels == LATENT_CHANNELS:
            if control.inpaint_mask is not None:
                raise ValueError(
                    "ControlNetInput.inpaint_mask: this ControlNet takes 16 channels (the 1.0 Union), which have no "
                    "inpaint mask; use the 2.x Union for inpainting"
                )
            return latents
        if channels != 2 * LATENT_CHANNELS + 1:
            raise ValueError(f"the loaded ControlNet takes {channels} input channels; Z-Image's take 16 or 33")
        mask = control.mask_tensor(height, width)
        if mask is None:
            keep = torch.zeros(1, 1, *size)
            picture = torch.zeros(1, 3, height, width)
        else:
            keep = F.interpolate(1 - mask, size=size, mode="nearest")
            picture = control.repaint_tensor(height, width) * (mask < 0.5)
        keep = keep.to(self.device, self.torch_dtype)
        return torch.cat([latents, keep, encode(picture)], dim=1)

    def _encode_pixels(self, pixels: torch.Tensor, tiled: bool = False, **tiles: int) -> torch.Tensor:
        return self.vae.encode(pixels.to(self.device, self.torch_dtype), **(tiles if tiled else {}))

    def control_conditions(
        self,
        controls: tuple[tuple[ControlNetInput, torch.Tensor], ...],
        index: int,
        total: int,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        conditions: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The ControlNet hints for one DiT call (one CFG branch: the hints depend on its prompt), summed over the
        inputs active at step ``index`` of ``total``; {} when none is."""
        hints = None
        timestep = (1 - sigmas.float()).to(latents.device)
        for control, context in controls:
            if not control.active(index, total):
                continue
            step = self.controlnet(
                self.dit, latents, timestep, conditions["text"], conditions.get("text_mask"), context, control.scale
            )
            hints = step if hints is None else hints + step
        if hints is None:
            return {}
        return {"controlnet_hints": hints.layers, "controlnet_refiner_hints": hints.refiner}

    @pipeline_step("dit", "controlnet")
    def denoise(
        self,
        latents: torch.Tensor,
        prompt: PromptEmbedding,
        negative: PromptEmbedding | None,
        scheduler: FlowMatchScheduler,
        cfg_scale: float,
        cfg_truncation: float = 1.0,
        cfg_normalization: float | bool = False,
        controls: tuple[tuple[ControlNetInput, torch.Tensor], ...] = (),
        references: References | None = None,
    ) -> torch.Tensor:
        """Run the sampler from float32 ``latents`` (B, 16, h, w) at ``scheduler.sigmas[0]`` down to sigma 0.

        Without ``negative`` (cfg_scale 1) the DiT runs once a step; with it, twice while CFG is active
        (``cfg_truncation``), and the guided velocity is capped by ``cfg_normalization``. Latents stay float32
        between steps, as the official pipeline keeps them; the DiT sees them in the pipeline's dtype. ``controls``:
        (input, control latents) pairs; the ControlNet runs for each branch at the steps in its window.
        """
        batch = latents.shape[0]
        conditional = self._conditions(prompt, references, batch)
        unconditional = None if negative is None else self._conditions(negative, references, batch)
        steps = scheduler.timesteps
        for index, sigma in enumerate(self.progress(steps, desc="denoising")):
            sigmas = torch.full((batch,), float(sigma), device=self.device)
            model_input = latents.to(self.torch_dtype)
            hints = self.control_conditions(controls, index, len(steps), model_input, sigmas, conditional)
            velocity = self.predict(self.dit, model_input, sigmas, conditional | hints)
            if unconditional is not None and cfg_active(float(sigma), cfg_truncation):
                hints = self.control_conditions(controls, index, len(steps), model_input, sigmas, unconditional)
                baseline = self.predict(self.dit, model_input, sigmas, unconditional | hints)
                velocity = guide(velocity, baseline, cfg_scale, cfg_normalization)
            latents = scheduler.step(velocity, index, latents)
            self.check_finite(latents, index, len(steps))
        return latents

    @staticmethod
    def _conditions(prompt: PromptEmbedding | OmniPrompt, references: References | None, batch: int) -> dict:
        if isinstance(prompt, PromptEmbedding):
            return {"text": prompt.text, "text_mask": prompt.mask}
        refs = references or References([], [])
        return {
            "text": [prompt.segments] * batch,
            "reference_latents": [refs.latents] * batch,
            "siglip_features": [refs.siglip or None] * batch,
        }

    @pipeline_step("vae")
    def decode(
        self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_overlap: int = 16
    ) -> torch.Tensor:
        tiles = dict(tile_size=tile_size, tile_overlap=tile_overlap) if tiled else {}
        return self.vae.decode(latents.to(self.torch_dtype), **tiles)

    # ------------------------------------------------------------------ the call
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
        sigma_shift: float | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        rand_device: str = "cpu",
        input_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        edit_image: Image.Image | list[Image.Image] | None = None,
        controlnet_inputs: ControlNetInput | list[ControlNetInput] | None = None,
        cfg_truncation: float = 1.0,
        cfg_normalization: float | bool = False,
        tiled: bool = False,
        tile_size: int = 64,
        tile_overlap: int = 16,
    ) -> Image.Image:
        """Generate one image. Sizes are pixels (multiples of 16); tile sizes are latents (8 pixels each).

        Options left as None take the loaded preset's values (``pipe.sampling_defaults``: Turbo 8 steps without CFG,
        base 50 steps with cfg 4), otherwise Turbo's: cfg 1, 1024x1024, 8 steps, shift 3.
        ``cfg_scale``: ``neg + s * (pos - neg)``, off at 1 (diffusers' ``guidance_scale`` is ``s - 1``); below 1 is
        an error. ``cfg_truncation``: CFG stops once ``1 - sigma`` passes it (1: never). ``cfg_normalization``: the
        guided velocity's norm is capped at the conditional one's times this factor (False/0: off; True: 1).
        ``noise``: (1, 16, height // 8, width // 8). ``edit_image``: one or more reference images for Omni-Base (its
        DiT and SigLIP2 ``image_encoder``), encoded as clean VAE latents and SigLIP2 features with diffusers' omni
        prompt template; an unset height or width is then the last reference's. ``controlnet_inputs``: one or
        more ``ControlNetInput`` for the loaded ``controlnet`` (the Fun ControlNet Union: canny, depth, pose, HED,
        ... maps, and with 2.x an inpaint mask); their hints add up.
        """
        edits = self._check_edit_image(edit_image)
        if edits:
            # As diffusers' omni pipeline: an unset height or width is the last reference's (cropped) size.
            _, last = prepare_reference(edits[-1], height, width)
            height, width = height or last.height, width or last.width
        cfg_scale, height, width, num_inference_steps, sigma_shift = self.sampling_options(
            cfg_scale=cfg_scale,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            sigma_shift=sigma_shift,
        ).values()
        check_size(height, width)
        self._check_options(cfg_scale, cfg_truncation, cfg_normalization, denoising_strength, input_image)
        controls = as_controlnet_inputs(controlnet_inputs)
        if edits and controls:
            raise ValueError("edit_image and controlnet_inputs cannot be combined (Omni-Base has no ControlNet)")
        self.require(
            *self.required_components, *(("controlnet",) if controls else ()), *(("image_encoder",) if edits else ())
        )
        for i, control in enumerate(controls):
            if control.controlnet_id != 0:
                raise ValueError(
                    f"controlnet_inputs[{i}].controlnet_id={control.controlnet_id}: ZImagePipeline has one ControlNet"
                )
        shape = (1, LATENT_CHANNELS, height // 8, width // 8)
        if noise is None:
            noise = self.generate_noise(shape, seed, rand_device=rand_device, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; {height}x{width} needs {shape}")
        noise = noise.to(self.device, torch.float32)

        scheduler = FlowMatchScheduler("z-image")
        scheduler.set_timesteps(num_inference_steps, denoising_strength=denoising_strength, sigma_shift=sigma_shift)

        references = None
        if edits:
            references = self.encode_references(edits, height, width)
            positive = self.encode_omni_prompt(prompt, len(edits))
            negative = self.encode_omni_prompt(negative_prompt, len(edits)) if cfg_scale != 1.0 else None
        else:
            positive = self.encode_prompt(prompt)
            negative = self.encode_prompt(negative_prompt) if cfg_scale != 1.0 else None

        latents = noise
        if input_image is not None:
            start = self.encode_image(
                input_image.convert("RGB").resize((width, height)), tiled, tile_size, tile_overlap
            )
            latents = FlowMatchScheduler.add_noise(start.float(), noise, scheduler.sigmas[0])

        tiles = dict(tile_size=tile_size, tile_overlap=tile_overlap)
        contexts = tuple((c, self.encode_control(c, height, width, tiled, **tiles)) for c in controls)
        latents = self.denoise(
            latents, positive, negative, scheduler, cfg_scale, cfg_truncation, cfg_normalization, contexts, references
        )
        pixels = self.decode(latents, tiled, tile_size, tile_overlap)
        self.load_models_to_device(())
        image = tensor_to_images(pixels)[0]
        image.info["diffsynth"] = metadata_json(
            {
                "prompt": prompt,
                "negative_prompt": negative_prompt or None,
                "seed": seed,
                "steps": num_inference_steps,
                "cfg_scale": cfg_scale,
                "cfg_truncation": cfg_truncation if cfg_scale != 1.0 and cfg_truncation <= 1 else None,
                "cfg_normalization": float(cfg_normalization) if cfg_scale != 1.0 and cfg_normalization else None,
                "size": f"{width}x{height}",
                "denoising_strength": denoising_strength if input_image else None,
                "sigma_shift": sigma_shift,
                "edit_images": len(edits) or None,
                "controlnet": [
                    {"type": c.control_type, "scale": c.scale, "start": c.start, "end": c.end} for c in controls
                ]
                or None,
                "model": getattr(self, "model_name", None),
            }
        )
        return image

    # ------------------------------------------------------------------ guards
    @staticmethod
    def _check_options(
        cfg_scale: float,
        cfg_truncation: float,
        cfg_normalization: float | bool,
        denoising_strength: float,
        input_image: Image.Image | None,
    ) -> None:
        if not isinstance(cfg_scale, int | float) or not math.isfinite(cfg_scale) or cfg_scale < 1:
            raise ValueError(
                f"cfg_scale={cfg_scale!r} must be a finite number >= 1 (1: no guidance; the usual scale "
                "neg + s * (pos - neg), so diffusers' guidance_scale g is cfg_scale = g + 1)"
            )
        if not isinstance(cfg_truncation, int | float) or math.isnan(cfg_truncation) or cfg_truncation < 0:
            raise ValueError(f"cfg_truncation={cfg_truncation!r} must be a number >= 0 (1 or more: never truncate)")
        if not isinstance(cfg_normalization, int | float) or not math.isfinite(cfg_normalization):
            raise ValueError(f"cfg_normalization={cfg_normalization!r} must be False, True or a finite factor")
        if denoising_strength != 1.0 and input_image is None:
            raise ValueError("denoising_strength != 1 needs an input_image to start from; pass input_image=...")

    def _check_edit_image(self, edit_image: object) -> list[Image.Image]:
        """The reference images as a list ([] for None); an error unless the DiT is Omni-Base's."""
        if edit_image is None:
            return []
        edits = list(edit_image) if isinstance(edit_image, list | tuple) else [edit_image]
        if not edits or not all(isinstance(image, Image.Image) for image in edits):
            raise ValueError("edit_image must be a PIL image or a non-empty list of PIL images")
        config = unwrap_model(self._components["dit"]).config if self._components.get("dit") is not None else None
        if getattr(config, "siglip_feat_dim", None) is None:
            raise ValueError(
                "edit_image needs Z-Image-Omni-Base (a DiT with the SigLIP image path); the loaded DiT has none, so "
                "it cannot take reference images. Use input_image with denoising_strength for image-to-image"
            )
        if self._components.get("image_encoder") is None:
            raise ValueError(
                "edit_image needs Omni-Base's SigLIP2 image encoder (image_encoder, siglip/model.safetensors); load "
                "the z-image-omni-base preset or pass it in model_configs"
            )
        return edits
