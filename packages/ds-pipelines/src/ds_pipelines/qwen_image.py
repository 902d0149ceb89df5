"""Qwen-Image (and 2512) text-to-image, image-to-image and inpainting, Qwen-Image-Edit (-2509, -2511) editing from
one or more images, and the blockwise (DiffSynth) and InstantX Union ControlNets, sampled as the official pipeline
and diffusers' ``QwenImagePipeline`` / ``QwenImageEditPlusPipeline`` do.

The DiT reads packed 2x2 latent patches (64 channels a token); ``predict`` packs and unpacks, so sampling and
training see latents ``(B, 16, H / 8, W / 8)`` and the usual flow velocity ``noise - x0`` at sigma. Edit models read
each edit image's clean latents as extra tokens after the target's, and the prompt through Qwen2.5-VL's image path.

``cfg_scale`` is the official "true CFG": ``comb = neg + s * (pos - neg)``, then each token of ``comb`` is rescaled to
the norm of the conditional prediction's token (over its 64 channels); off at 1 (upstream DiffSynth-Studio omits the
rescale; the official pipeline and diffusers have it, and so do we).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image

from ds_loader.families import Preset
from ds_vram import VRAMConfig

from .base import Pipeline, pipeline_step, source_folder, subfolder_sources, unwrap_model
from .controlnet import ControlNetInput, as_controlnet_inputs
from .media import image_to_tensor, metadata_json, tensor_to_images
from .schedulers import FlowMatchScheduler

__all__ = ["QwenImagePipeline", "edit_dimensions", "true_cfg"]

LATENT_CHANNELS = 16
PIXELS_PER_TOKEN = 16  # 8x VAE, then 2x2 patches
MAX_PROMPT_TOKENS = 512  # the official text length after the template's prefix; longer prompts are an error
OUTPUT_AREA = 1024 * 1024  # with edit images and no size: the last edit image's aspect at about one megapixel
EDIT_VAE_AREA = 1024 * 1024  # Edit-2509/2511 encode each edit image at about this area (diffusers' VAE_IMAGE_SIZE)
EDIT_VL_AREA = 384 * 384  # ... and show it to Qwen2.5-VL at about this one (diffusers' CONDITION_IMAGE_SIZE)
SCHEDULES = ("qwen-image", "qwen-image-lightning")
EDIT_VARIANTS = ("edit", "edit-plus")
# A diffusers folder's pipeline class says which edit template its DiT was trained with.
_EDIT_PIPELINES = {"QwenImageEditPipeline": "edit", "QwenImageEditPlusPipeline": "edit-plus"}


@dataclass
class PromptEmbedding:
    """Qwen2.5-VL's last hidden states of the templated prompt, the template's prefix dropped, zero-padded."""

    text: torch.Tensor  # (B, L, 3584)
    mask: torch.Tensor | None  # (B, L) bool, True on the prompt's tokens; None when all are


BlockResidual = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def edit_dimensions(width: int, height: int, area: int) -> tuple[int, int]:
    """(width, height) with the aspect ratio of ``width x height`` at about ``area`` pixels, each rounded to a multiple
    of 32, as diffusers' Qwen-Image edit pipelines size edit images and the default output."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    new_height = new_width / ratio
    return max(32, round(new_width / 32) * 32), max(32, round(new_height / 32) * 32)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, 16, h, w) latents to (B, h/2 * w/2, 64) tokens of 2x2 patches, as the DiT reads them."""
    from ds_models_qwen_image.dit import pack_latents as pack

    return pack(latents)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` x ``width`` (latent pixels)."""
    from ds_models_qwen_image.dit import unpack_latents as unpack

    return unpack(tokens, height, width)


def true_cfg(positive: torch.Tensor, negative: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """The official Qwen-Image guidance on velocities (B, 16, h, w): ``comb = neg + s * (pos - neg)``, then each 2x2
    patch token of ``comb`` scaled to the norm of ``pos``'s token (its 64 channels). Computed in float32."""
    height, width = positive.shape[-2:]
    pos, neg = pack_latents(positive.float()), pack_latents(negative.float())
    comb = neg + cfg_scale * (pos - neg)
    comb = comb * (
        torch.linalg.vector_norm(pos, dim=-1, keepdim=True) / torch.linalg.vector_norm(comb, dim=-1, keepdim=True)
    )
    return unpack_latents(comb, height, width)


class QwenImagePipeline(Pipeline):
    """Qwen-Image, Qwen-Image-2512 and the Qwen-Image-Edit models.

    Components: ``tokenizer`` (Qwen2 BPE) + ``text_encoder`` (transformers Qwen2.5-VL), ``processor`` (Qwen2.5-VL's
    processor, for the Edit models' image path; built over the PIL image processor, no torchvision), ``dit``
    (``QwenImageDiT``), ``vae`` (ds-models-wan's ``WanVAE`` reading the release's ``AutoencoderKLQwenImage``), and
    optionally ``controlnet`` (a blockwise ControlNet or the InstantX Union; load it with ``model_configs``).
    """

    component_names = ("tokenizer", "processor", "text_encoder", "dit", "vae", "controlnet")
    required_components = ("tokenizer", "text_encoder", "dit", "vae")
    default_options: ClassVar[Mapping[str, object]] = {
        "cfg_scale": 4.0,
        "height": 1328,
        "width": 1328,
        "num_inference_steps": 30,
        "schedule": "qwen-image",
    }
    family = "qwen-image"
    folder_layout = (
        "transformer/, text_encoder/, tokenizer/ and vae/ (and processor/ for the Edit models; the diffusers layout "
        "Qwen releases)"
    )

    def __init__(self, components: Mapping[str, Any], **kwargs: Any):
        super().__init__(components, **kwargs)
        # Which prompt template edit images take: "edit" (the original Qwen-Image-Edit: one image, its own
        # template) or "edit-plus" (Edit-2509/2511: "Picture i:" labels, ~384² for the VL encoder). The preset or
        # the folder's model_index.json sets it; set it by hand for files loaded through model_configs.
        self.edit_variant = "edit-plus"

    # ------------------------------------------------------------------ loading (the base from_pretrained calls these)
    @classmethod
    def folder_sources(cls, folder: Path) -> dict[str, object]:
        """Qwen's repositories are diffusers folders: ``transformer/``, ``text_encoder/``, ``vae/``, ``tokenizer/``,
        and ``processor/`` in the Edit ones."""
        return subfolder_sources(
            folder,
            {
                "transformer": "dit",
                "text_encoder": "text_encoder",
                "vae": "vae",
                "tokenizer": "tokenizer",
                "processor": "processor",
            },
        )

    @classmethod
    def tokenizer_name(cls, folder: Path) -> str | None:
        """A folder with an image processor config is the VL ``processor`` (it holds tokenizer files too)."""
        if (folder / "preprocessor_config.json").is_file():
            return "processor"
        return super().tokenizer_name(folder)

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

        from ds_models_qwen_image.dit_specs import DIT_SPEC
        from ds_models_qwen_image.specs import TEXT_ENCODER_SPEC
        from ds_models_qwen_image.text_encoder import load_processor
        from ds_models_wan.vae_specs import VAE21_SPEC

        model_specs = {
            "dit": DIT_SPEC,
            "vae": VAE21_SPEC,  # Qwen-Image's AutoencoderKLQwenImage is the Wan 2.1 VAE
            "text_encoder": TEXT_ENCODER_SPEC,
            "controlnet": None,  # detected: a blockwise ControlNet or the InstantX Union
        }
        components: dict[str, object] = cls.load_models(
            sources, model_specs, required=cls.required_components, device=device, torch_dtype=torch_dtype, vram=vram
        )
        components["tokenizer"] = AutoTokenizer.from_pretrained(source_folder(sources["tokenizer"]))
        if "processor" in sources:
            components["processor"] = load_processor(source_folder(sources["processor"]))
        return components

    def configure(self, preset: Preset | None) -> None:
        """What the weights cannot show. The edit template: a preset names it (``edit_variant``), a diffusers
        folder's ``model_index.json`` gives it by its pipeline class. Edit-2511's ``zero_cond_t``: the DiT spec reads
        it from ``config.json`` or ComfyUI's marker; a preset's own DiT config says it when neither came with the
        files (the preset downloads only the weights)."""
        if preset is not None:
            variant = getattr(preset, "edit_variant", None)
            self.edit_variant = variant if variant in EDIT_VARIANTS else "edit-plus"
            self._set_zero_cond_t(getattr(preset, "dit_config", None))
            return
        if self.model_name is not None:
            try:
                index = json.loads((Path(self.model_name) / "model_index.json").read_text())
            except (OSError, ValueError, AttributeError):
                return
            self.edit_variant = _EDIT_PIPELINES.get(index.get("_class_name"), self.edit_variant)

    def _set_zero_cond_t(self, dit_config: str | None) -> None:
        from ds_models_qwen_image.dit import QwenImageDiTConfig

        dit = self._components.get("dit")
        if dit_config is None or dit is None:
            return
        model = unwrap_model(dit)
        wanted = QwenImageDiTConfig.preset(dit_config).zero_cond_t
        if model.config.zero_cond_t != wanted:
            model.config = dataclasses.replace(model.config, zero_cond_t=wanted)

    # ------------------------------------------------------------------ the DiT call
    @staticmethod
    def predict(
        model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, conditions: Mapping[str, object]
    ) -> torch.Tensor:
        """Qwen-Image's flow velocity for latents (B, 16, h, w) at ``sigmas`` (B,) in [0, 1], the one DiT call of
        sampling and training.

        conditions:
            ``text`` (B, L, 3584) prompt states; ``text_mask`` (B, L) bool (None or absent: all tokens valid; a float
            0/1 mask, as a batch cast to the training dtype carries it, is read as > 0.5);
            ``reference_latents`` (optional) a list of clean edit-image latents (B, 16, h_i, w_i), appended after
            the target's tokens (Edit models; Edit-2511's DiT runs them at t = 0 by its ``zero_cond_t``);
            ``block_residual`` (optional) ``(block index, image-stream states) -> residual or None``, how the
            ControlNets enter (see ``QwenImageDiT.forward``).
        Returns the velocity (B, 16, h, w) of the target tokens, in the DiT's output dtype.
        """
        batch, _, height, width = latents.shape
        tokens = [pack_latents(latents)]
        shapes = [(1, height // 2, width // 2)]
        for reference in conditions.get("reference_latents") or ():
            reference = reference.to(latents.dtype)
            if reference.shape[0] != batch:
                reference = reference.expand(batch, *reference.shape[1:])
            tokens.append(pack_latents(reference))
            shapes.append((1, reference.shape[-2] // 2, reference.shape[-1] // 2))
        mask = conditions.get("text_mask")
        if mask is not None and mask.dtype != torch.bool:
            mask = mask > 0.5
        output = model(
            torch.cat(tokens, dim=1),
            sigmas.to(latents.device, latents.dtype),
            conditions["text"],
            mask,
            shapes,
            block_residual=conditions.get("block_residual"),
        )
        return unpack_latents(output[:, : tokens[0].shape[1]], height, width)

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
        """See ``Pipeline.run_component``. Qwen2.5-VL on a full 512-token prompt (plus the template), one DiT
        prediction through ``predict`` with 512 prompt tokens, an untiled decode."""

        def noise(*shape: int) -> torch.Tensor:
            return torch.randn(1, *shape, device=device, dtype=torch.bfloat16)

        if name == "text_encoder":
            vocab = module.config.get_text_config().vocab_size
            ids = torch.randint(0, vocab, (1, MAX_PROMPT_TOKENS + 34), device=device)
            return module(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        if name == "dit":
            config = unwrap_model(module).config
            conditions = {
                "text": noise(MAX_PROMPT_TOKENS, config.joint_attention_dim),
                "text_mask": torch.ones(1, MAX_PROMPT_TOKENS, dtype=torch.bool, device=device),
            }
            sigmas = torch.full((1,), 0.5, device=device)
            return cls.predict(module, noise(LATENT_CHANNELS, height // 8, width // 8), sigmas, conditions)
        if name == "vae":
            from ds_models_qwen_image.vae import decode_latents

            return decode_latents(module, noise(LATENT_CHANNELS, height // 8, width // 8))
        raise ValueError(f"{cls.__name__} has no model component {name!r}")

    # ------------------------------------------------------------------ steps
    @pipeline_step("text_encoder")
    def encode_prompt(self, prompt: str | list[str]) -> PromptEmbedding:
        """Qwen2.5-VL's last hidden states of the text-to-image template (its first 34 tokens dropped), as diffusers
        encodes them; a prompt over 512 tokens is an error (``PromptTooLongError``, a ValueError)."""
        from ds_models_qwen_image.text_encoder import encode_prompt

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        # On the pipeline's device: a managed encoder's parameters may sit in CPU RAM or, unread, on disk.
        text, mask = encode_prompt(self.text_encoder, self.tokenizer, prompts, device=self.device)
        return _embedding(text, mask, self.device, self.torch_dtype)

    @pipeline_step("text_encoder")
    def encode_edit_prompt(self, prompt: str, images: list[Image.Image]) -> PromptEmbedding:
        """The edit template with the edit images through Qwen2.5-VL's image path (its first 64 tokens dropped):
        ``edit_variant`` "edit" (one image, the original model's template) or "edit-plus" ("Picture i:" labels)."""
        from ds_models_qwen_image.text_encoder import encode_edit_prompt

        text, mask = encode_edit_prompt(
            self.text_encoder,
            self.processor,
            [prompt],
            images,
            variant=self.edit_variant,
            device=self.device,
            resize=False,  # prepare_edit_images sized them
        )
        return _embedding(text, mask, self.device, self.torch_dtype)

    @pipeline_step("vae")
    def encode_image(
        self, image: Image.Image | torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_overlap: int = 32
    ) -> torch.Tensor:
        """An image (PIL, or (B, 3, H, W) in [-1, 1]) to normalised latents (B, 16, H/8, W/8): the VAE's mean, as
        diffusers encodes edit images (its ``argmax``)."""
        from ds_models_qwen_image.vae import encode_image

        pixels = image if isinstance(image, torch.Tensor) else image_to_tensor(image)
        pixels = pixels.to(self.device, self.torch_dtype)
        if not tiled:
            return encode_image(self.vae, pixels)
        tiles = _tiles(tile_size, tile_overlap)
        return self.vae.encode(pixels.unsqueeze(2), tiled=True, **tiles).squeeze(2)

    @pipeline_step("vae")
    def decode(
        self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 64, tile_overlap: int = 32
    ) -> torch.Tensor:
        """Normalised latents (B, 16, h, w) to pixels (B, 3, 8h, 8w) in [-1, 1]."""
        from ds_models_qwen_image.vae import decode_latents

        latents = latents.to(self.device, self.torch_dtype)
        if not tiled:
            return decode_latents(self.vae, latents)
        return self.vae.decode(latents.unsqueeze(2), tiled=True, **_tiles(tile_size, tile_overlap)).squeeze(2)

    def control_channels(self) -> int:
        """Latent channels a control input gives the loaded ControlNet: 16, or 17 for the inpainting models."""
        return unwrap_model(self._components["controlnet"]).config.conditioning_dim // 4

    @property
    def controlnet_is_blockwise(self) -> bool:
        """Whether the loaded ControlNet is a blockwise one (its residual ignores the prompt; ds-train trains it)."""
        from ds_models_qwen_image.controlnet import QwenImageBlockwiseControlNet

        return isinstance(unwrap_model(self._components.get("controlnet")), QwenImageBlockwiseControlNet)

    @pipeline_step("vae")
    def encode_control(
        self, control: ControlNetInput, height: int, width: int, tiled: bool = False, **tiles: int
    ) -> torch.Tensor:
        """The ControlNet's conditioning for one input: packed tokens (1, N_target, 64 or 68) at the target's size.

        The InstantX Union and the blockwise Canny/Depth models read the control image's latents (16 channels a
        latent pixel). The inpainting models (blockwise Inpaint, InstantX Inpainting) read 17, as DiffSynth-Studio
        and diffusers build them: the latents of the picture with the pixels to repaint set to black, then
        ``1 - mask`` at latent size (nearest).
        """
        from ds_models_qwen_image.controlnet import inpaint_conditioning, mask_control_image

        channels = self.control_channels()
        if control.inpaint_mask is None:
            if channels != LATENT_CHANNELS:
                raise ValueError(
                    f"the loaded ControlNet reads {channels} latent channels (an inpainting model); give the "
                    "ControlNetInput an inpaint_mask (white = repaint)"
                )
            return pack_latents(self.encode_image(control.image_tensor(height, width), tiled, **tiles))
        if channels != LATENT_CHANNELS + 1:
            raise ValueError(
                "ControlNetInput.inpaint_mask: the loaded ControlNet has no mask input (it reads "
                f"{channels} latent channels); use an inpainting ControlNet (blockwise Inpaint, InstantX Inpainting)"
            )
        mask = control.mask_tensor(height, width)
        picture = mask_control_image(control.repaint_tensor(height, width), mask)
        latents = self.encode_image(picture, tiled, **tiles)
        return pack_latents(inpaint_conditioning(latents, mask.to(latents.device)))

    def control_residual(
        self,
        controls: Sequence[tuple[ControlNetInput, torch.Tensor]],
        index: int,
        total: int,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompt: PromptEmbedding,
    ) -> BlockResidual | None:
        """The DiT's ``block_residual`` at step ``index`` of ``total``: the sum over the inputs active in their
        window of the ControlNet's residuals times their scale; None when none is. The InstantX Union runs here,
        once, on the target's latents and ``prompt`` (diffusers uses the positive prompt's samples for both CFG
        branches); the blockwise models act inside the DiT, on each branch's own hidden states."""
        from ds_models_qwen_image.controlnet import QwenImageControlNetUnion, sum_block_residuals

        controlnet = self.controlnet
        union = isinstance(unwrap_model(controlnet), QwenImageControlNetUnion)
        height, width = latents.shape[-2:]
        residuals = []
        for control, conditioning in controls:
            if not control.active(index, total) or control.scale == 0:
                continue
            conditioning = conditioning.to(latents.dtype)
            if union:
                layers = unwrap_model(self.dit).config.num_layers
                residual = controlnet.block_residual(
                    layers,
                    pack_latents(latents),
                    sigmas.to(latents.dtype),
                    prompt.text,
                    prompt.mask,
                    [(1, height // 2, width // 2)],
                    conditioning,
                    control.scale,
                )
            else:
                residual = controlnet.block_residual(conditioning, control.scale)
            residuals.append(residual)
        return sum_block_residuals(residuals)

    @pipeline_step("dit", "controlnet")
    def denoise(
        self,
        latents: torch.Tensor,
        prompt: PromptEmbedding,
        negative: PromptEmbedding | None,
        scheduler: FlowMatchScheduler,
        cfg_scale: float,
        references: Sequence[torch.Tensor] = (),
        controls: Sequence[tuple[ControlNetInput, torch.Tensor]] = (),
        inpaint: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the sampler from float32 ``latents`` (1, 16, h, w) at ``scheduler.sigmas[0]`` down to sigma 0.

        Without ``negative`` the DiT runs once a step; with it twice, combined by ``true_cfg``. ``references``: clean
        edit latents. ``controls``: (input, conditioning) pairs; the ControlNet residuals are computed from the
        positive prompt and added in both CFG branches, as diffusers' ControlNet pipeline does. ``inpaint``: (mask at
        latent size, 1 = repaint; the input image's latents): outside the mask the velocity is replaced by the one
        that leads straight back to the input, as DiffSynth-Studio inpaints.
        """
        conditional = {"text": prompt.text, "text_mask": prompt.mask, "reference_latents": list(references)}
        unconditional = None
        if negative is not None:
            unconditional = {"text": negative.text, "text_mask": negative.mask, "reference_latents": list(references)}
        steps = scheduler.timesteps
        for index, sigma in enumerate(self.progress(steps, desc="denoising")):
            sigmas = torch.full((latents.shape[0],), float(sigma), device=self.device)
            model_input = latents.to(self.torch_dtype)
            residual = self.control_residual(controls, index, len(steps), model_input, sigmas, prompt)
            extra = {"block_residual": residual} if residual is not None else {}
            velocity = self.predict(self.dit, model_input, sigmas, conditional | extra)
            if unconditional is not None:
                baseline = self.predict(self.dit, model_input, sigmas, unconditional | extra)
                velocity = true_cfg(velocity, baseline, cfg_scale)
            if inpaint is not None:
                mask, start = inpaint
                expected = (latents - start) / float(sigma)
                velocity = expected * (1 - mask) + velocity.float() * mask
            latents = scheduler.step(velocity, index, latents)
            self.check_finite(latents, index, len(steps))
        return latents

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
        schedule: str | None = None,
        sigma_shift: float | None = None,
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        rand_device: str = "cpu",
        input_image: Image.Image | None = None,
        denoising_strength: float = 1.0,
        inpaint_mask: Image.Image | None = None,
        edit_image: Image.Image | Sequence[Image.Image] | None = None,
        controlnet_inputs: ControlNetInput | Sequence[ControlNetInput] | None = None,
        tiled: bool = False,
        tile_size: int = 64,
        tile_overlap: int = 32,
    ) -> Image.Image:
        """Generate one image. Sizes are pixels (multiples of 16); tile sizes are latents (8 pixels each).

        Options left as None take the loaded preset's values (``pipe.sampling_defaults``), otherwise Qwen-Image's:
        cfg 4, 1328x1328, 30 steps, the ``"qwen-image"`` schedule (mu from the image token count, terminal 0.02;
        ``"qwen-image-lightning"`` for the Lightning LoRAs: shift 3, no stretch). ``sigma_shift`` replaces the
        schedule's shift. ``cfg_scale``: the official true CFG with the per-token rescale (1: off); the negative
        prompt is ``negative_prompt`` ("" when unset).
        ``noise``: (1, 16, height // 8, width // 8). ``input_image`` + ``denoising_strength`` < 1: image-to-image;
        ``inpaint_mask`` (white = repaint) with ``input_image``: only the masked part changes.
        ``edit_image``: one image or a list, for the Edit models (the loaded ``processor`` is needed). Edit-2509/2511
        label each "Picture i:" and see them at ~384² in the VL encoder and ~1 MP in the VAE; the original Edit model
        takes one image. With edit images and no height/width, the output takes the last edit image's aspect ratio
        at about one megapixel. ``controlnet_inputs``: one or more ``ControlNetInput`` for the loaded ``controlnet``.
        """
        edits = self._check_edit_image(edit_image)
        if edits and (height is None or width is None):
            # As diffusers' edit pipelines: the last edit image's aspect ratio at about 1 MP, multiples of 32.
            size_w, size_h = edit_dimensions(*edits[-1].size, OUTPUT_AREA)
            height, width = height or size_h, width or size_w
        cfg_scale, height, width, num_inference_steps, schedule = self.sampling_options(
            cfg_scale=cfg_scale,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            schedule=schedule,
        ).values()
        _check_size(height, width)
        self._check_options(cfg_scale, schedule, denoising_strength, input_image, inpaint_mask)
        controls = as_controlnet_inputs(controlnet_inputs)
        self.require(
            *self.required_components, *(("controlnet",) if controls else ()), *(("processor",) if edits else ())
        )
        for i, control in enumerate(controls):
            if control.controlnet_id != 0:
                raise ValueError(
                    f"controlnet_inputs[{i}].controlnet_id={control.controlnet_id}: QwenImagePipeline has one "
                    "ControlNet (controlnet_id 0)"
                )
        shape = (1, LATENT_CHANNELS, height // 8, width // 8)
        if noise is None:
            noise = self.generate_noise(shape, seed, rand_device=rand_device, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; {height}x{width} needs {shape}")
        noise = noise.to(self.device, torch.float32)

        scheduler = FlowMatchScheduler(schedule)
        scheduler.set_timesteps(
            num_inference_steps,
            denoising_strength=denoising_strength,
            image_sequence_length=(height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN),
            sigma_shift=sigma_shift,
        )

        tiles = dict(tile_size=tile_size, tile_overlap=tile_overlap)
        references: list[torch.Tensor] = []
        if edits:
            vl_images, vae_images = self.prepare_edit_images(edits)
            positive = self.encode_edit_prompt(prompt, vl_images)
            negative = self.encode_edit_prompt(negative_prompt, vl_images) if cfg_scale > 1 else None
            references = [self.encode_image(image, tiled, **tiles).float() for image in vae_images]
        else:
            positive = self.encode_prompt(prompt)
            negative = self.encode_prompt(negative_prompt) if cfg_scale > 1 else None

        latents = noise
        inpaint = None
        if input_image is not None:
            source = input_image.convert("RGB")
            if source.size != (width, height):
                source = source.resize((width, height), Image.Resampling.LANCZOS)
            start = self.encode_image(source, tiled, **tiles).float()
            latents = FlowMatchScheduler.add_noise(start, noise, scheduler.sigmas[0])
            if inpaint_mask is not None:
                inpaint = (self._latent_mask(inpaint_mask, height, width), start)

        contexts = tuple((c, self.encode_control(c, height, width, tiled, **tiles)) for c in controls)
        latents = self.denoise(latents, positive, negative, scheduler, cfg_scale, references, contexts, inpaint)
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
                "size": f"{width}x{height}",
                "schedule": schedule,
                "sigma_shift": sigma_shift,
                "denoising_strength": denoising_strength if input_image is not None else None,
                "inpaint": True if inpaint is not None else None,
                "edit_images": len(edits) or None,
                "controlnet": [
                    {"type": c.control_type, "scale": c.scale, "start": c.start, "end": c.end} for c in controls
                ]
                or None,
                "model": getattr(self, "model_name", None),
            }
        )
        return image

    def prepare_edit_images(self, edits: Sequence[Image.Image]) -> tuple[list[Image.Image], list[Image.Image]]:
        """(what Qwen2.5-VL sees, what the VAE encodes) for each edit image, resized with LANCZOS as diffusers does.

        Edit-2509/2511: ~384² (``EDIT_VL_AREA``) and ~1 MP (``EDIT_VAE_AREA``), each a multiple of 32 with the
        image's aspect ratio. The original Edit model: one image at ~1 MP for both.
        """
        vl_images, vae_images = [], []
        for image in edits:
            image = image.convert("RGB")
            vae_size = edit_dimensions(*image.size, EDIT_VAE_AREA)
            vae_image = image.resize(vae_size, Image.Resampling.LANCZOS)
            if self.edit_variant == "edit":
                vl_images.append(vae_image)
            else:
                vl_size = edit_dimensions(*image.size, EDIT_VL_AREA)
                vl_images.append(image.resize(vl_size, Image.Resampling.LANCZOS))
            vae_images.append(vae_image)
        return vl_images, vae_images

    def _latent_mask(self, mask: Image.Image, height: int, width: int) -> torch.Tensor:
        """The inpaint mask at latent size, (1, 1, h/8, w/8) in [0, 1] (1 = repaint), each latent pixel the mean of
        its 8x8 pixels."""
        gray = mask.convert("L")
        if gray.size != (width, height):
            gray = gray.resize((width, height), Image.Resampling.LANCZOS)
        small = gray.resize((width // 8, height // 8), Image.Resampling.BOX)
        values = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).view(1, 1, height // 8, width // 8)
        return (values.to(torch.float32) / 255.0).to(self.device)

    # ------------------------------------------------------------------ guards
    @staticmethod
    def _check_options(
        cfg_scale: float,
        schedule: str,
        denoising_strength: float,
        input_image: Image.Image | None,
        inpaint_mask: Image.Image | None,
    ) -> None:
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, int | float) or not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale={cfg_scale!r} must be a finite number (1 or less: no guidance)")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not a Qwen-Image schedule; use one of {', '.join(SCHEDULES)}")
        if denoising_strength != 1.0 and input_image is None:
            raise ValueError(
                f"denoising_strength={denoising_strength} needs an input_image to start from; pass input_image=..."
            )
        if input_image is not None and not isinstance(input_image, Image.Image):
            raise ValueError(f"input_image must be a PIL image, got {type(input_image).__name__}")
        if inpaint_mask is not None:
            if not isinstance(inpaint_mask, Image.Image):
                raise ValueError(
                    f"inpaint_mask must be a PIL image (white = repaint), got {type(inpaint_mask).__name__}"
                )
            if input_image is None:
                raise ValueError(
                    "inpaint_mask needs the input_image whose masked part is repainted; pass input_image=..."
                )

    def _check_edit_image(self, edit_image: object) -> list[Image.Image]:
        """The edit images as a list ([] for None); an error naming the value when one is not a PIL image, and for
        several images on the original Edit model."""
        if edit_image is None:
            return []
        edits = list(edit_image) if isinstance(edit_image, list | tuple) else [edit_image]
        if not edits:
            raise ValueError("edit_image is an empty list; pass a PIL image, a list of them, or None")
        for index, image in enumerate(edits):
            if not isinstance(image, Image.Image):
                where = "edit_image" if not isinstance(edit_image, list | tuple) else f"edit_image[{index}]"
                raise ValueError(f"{where} is a {type(image).__name__} ({image!r:.60}), not a PIL image")
            if image.width < 1 or image.height < 1:
                raise ValueError(f"edit_image[{index}] is an empty image ({image.width}x{image.height})")
        if self._components.get("processor") is None:
            raise ValueError(
                "edit_image needs Qwen2.5-VL's processor (the processor/ folder of a Qwen-Image-Edit release), which "
                "is not loaded; load an Edit model or pass model_configs={'processor': folder}"
            )
        if self.edit_variant == "edit" and len(edits) > 1:
            raise ValueError(
                f"edit_image: {len(edits)} images, but the original Qwen-Image-Edit takes one; multi-image editing "
                "needs Qwen-Image-Edit-2509 or -2511"
            )
        return edits


def _check_size(height: int, width: int) -> None:
    """Multiples of 16 pixels (8x VAE, 2x2 patches); say which sizes are nearest instead of silently rounding."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < PIXELS_PER_TOKEN:
            raise ValueError(f"{name}={value!r} must be an integer of at least {PIXELS_PER_TOKEN}")
        if value % PIXELS_PER_TOKEN:
            lower = value // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN
            raise ValueError(
                f"{name}={value} is not a multiple of {PIXELS_PER_TOKEN}; the nearest valid sizes are "
                f"{max(lower, PIXELS_PER_TOKEN)} and {lower + PIXELS_PER_TOKEN}"
            )


def _embedding(
    text: torch.Tensor, mask: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> PromptEmbedding:
    mask = None if mask is None else mask.to(device=device, dtype=torch.bool)
    return PromptEmbedding(text.to(device, dtype), mask)


def _tiles(tile_size: int, tile_overlap: int) -> dict[str, tuple[int, int]]:
    """The Wan VAE's tile keywords (latent pixels) from a square tile and its overlap."""
    if not 0 <= tile_overlap < tile_size:
        raise ValueError(f"tile_overlap={tile_overlap} must be in [0, tile_size={tile_size})")
    stride = tile_size - tile_overlap
    return {"tile_size": (tile_size, tile_size), "tile_stride": (stride, stride)}
