"""Wan 2.1 / 2.2 video generation, sampled as the official repositories do.

Modes follow from the DiT's config and the inputs: text-to-video; image-to-video (Wan2.1 I2V and Wan2.2 I2V-A14B:
the DiT also takes ``y``, 4 first-frame mask channels and the VAE latents of ``[image, zeros...]``, plus CLIP image
tokens where the model has ``img_emb``); first-last-frame (``end_image``; FLF2V-14B also takes both images' CLIP
tokens); video-to-video (``input_video`` and ``denoising_strength``); TI2V-5B (the first frame's latents pinned, per
token timesteps 0 on that frame); and Wan2.2 A14B's two experts, the high-noise one (``dit``) for timesteps at or
above ``boundary * 1000`` and the low-noise one (``dit2``) below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image

from ds_loader.families import Preset
from ds_vram import VRAMConfig

from .base import Pipeline, pipeline_step, source_folder, unwrap_model
from .media import VideoFrames, image_to_tensor, tensor_to_images
from .schedulers import FlowMatchScheduler, FlowUniPCScheduler
from .wan_sources import folder_sources, spec_for

__all__ = ["WanVideoPipeline", "check_video_size"]

SAMPLERS = {"euler": FlowMatchScheduler, "unipc": FlowUniPCScheduler}
DEFAULT_BOUNDARY, I2V_BOUNDARY = 0.875, 0.9


def check_video_size(height: int, width: int, num_frames: int, multiple: int) -> None:
    """Wan needs 4k+1 frames and sizes in multiples of ``multiple`` (16; 32 with the 2.2 VAE); name valid values."""
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % 4:
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames!r} must be a positive integer of the form 4k+1 (1, 5, ..., 81)")
        lower = (num_frames - 1) // 4 * 4 + 1
        raise ValueError(
            f"num_frames={num_frames} is not of the form 4k+1 (the VAE packs 4 frames per latent after the first); "
            f"the nearest valid counts are {lower} and {lower + 4}"
        )
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < multiple:
            raise ValueError(f"{name}={value!r} must be an integer of at least {multiple}")
        if value % multiple:
            lower = value // multiple * multiple
            raise ValueError(
                f"{name}={value} is not a multiple of {multiple} (VAE downsampling x 2x2 patches); the nearest "
                f"valid sizes are {lower} and {lower + multiple}"
            )


@dataclass
class _Sampling:
    """What the denoising steps share: the latents (float32), the schedule and the model inputs besides them."""

    latents: torch.Tensor
    scheduler: FlowMatchScheduler
    context: torch.Tensor
    negative: torch.Tensor | None
    cfg_scale: float
    cfg_scale_high_noise: float  # the A14B high-noise expert's guidance (the official (low, high) pair)
    clip_feature: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    pinned: torch.Tensor | None = None  # TI2V: the first frame's latents, kept through sampling
    experts: list[str] | None = None  # which component ran each step (for inspection)


class WanVideoPipeline(Pipeline):
    """Wan 2.1 (T2V-1.3B/14B, I2V-14B, FLF2V-14B) and Wan 2.2 (T2V-A14B, I2V-A14B, TI2V-5B).

    Components: ``tokenizer`` + ``text_encoder`` (umT5-XXL), ``image_encoder`` (CLIP ViT-H/14, for models with image
    tokens), ``dit`` (``WanDiT``; the high-noise expert of an A14B pair), ``dit2`` (the A14B low-noise expert, or
    None), ``vae`` (``WanVAE`` or ``WanVAE22``). ``fps`` is the model's native frame rate (16; 24 for TI2V-5B).
    """

    component_names = ("tokenizer", "text_encoder", "image_encoder", "dit", "dit2", "vae")
    default_options: ClassVar[Mapping[str, object]] = {
        "cfg_scale": 5.0,
        "cfg_scale_high_noise": None,
        "height": 480,
        "width": 832,
        "num_frames": 81,
        "num_inference_steps": 50,
        "sigma_shift": 5.0,
    }

    def __init__(self, components: Mapping[str, object], *, fps: float | None = None, **kwargs: object):
        super().__init__(components, **kwargs)
        vae = self._components.get("vae")
        self.fps = fps if fps is not None else (24 if getattr(vae, "z_dim", 16) == 48 else 16)
        self.boundary: float | None = None  # None: 0.875, or 0.9 for image-to-video A14B
        self.model_name: str | None = None
        self.last_experts: list[str] = []  # the DiT that ran each step of the last call ("dit" / "dit2")

    # ------------------------------------------------------------------ loading (the base from_pretrained calls these)
    family = "wan"
    required_components = ("tokenizer", "text_encoder", "dit", "vae")
    preset_components: ClassVar[Mapping[str, str]] = {"dit_high_noise": "dit", "dit_low_noise": "dit2"}
    second_components: ClassVar[Mapping[str, str]] = {
        "dit": "dit2"
    }  # a second DiT in a model_configs list is the A14B low-noise expert
    folder_layout = (
        "the DiT (diffusion_pytorch_model*.safetensors, or high_noise_model/ + low_noise_model/), Wan2.1_VAE.pth or "
        "Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth and google/umt5-xxl/ (or the diffusers folders "
        "transformer/, vae/, text_encoder/, tokenizer/)"
    )

    @classmethod
    def folder_sources(cls, folder: Path) -> dict[str, object]:
        """A Wan-AI repository's files, or diffusers folders (``transformer/``, ``transformer_2/``, ...)."""
        return folder_sources(folder)

    @classmethod
    def load_components(
        cls,
        sources: Mapping[str, object],
        *,
        device: torch.device,
        torch_dtype: torch.dtype,
        vram: VRAMConfig | Mapping[str, VRAMConfig] | None,
    ) -> dict[str, object]:
        from ds_models_wan.text_encoder import load_wan_tokenizer

        models = [name for name in ("text_encoder", "image_encoder", "dit", "dit2", "vae") if name in sources]
        components: dict[str, object] = cls.load_models(
            sources,
            {name: spec_for(name, sources[name]) for name in models},
            required=cls.required_components,
            device=device,
            torch_dtype=torch_dtype,
            vram=vram,
        )
        components["tokenizer"] = load_wan_tokenizer(source_folder(sources["tokenizer"]))
        return components

    @classmethod
    def init_options(cls, preset: Preset | None) -> dict[str, object]:
        return {"fps": getattr(preset, "fps", None)}

    def configure(self, preset: Preset | None) -> None:
        self.boundary = getattr(preset, "boundary", None)

    # ------------------------------------------------------------------ the DiT call
    @staticmethod
    def predict(
        model: torch.nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, conditions: Mapping[str, object]
    ) -> torch.Tensor:
        """Wan's velocity for latents (B, C, F, H, W) at ``sigmas`` (B,), the one DiT call of sampling and training.

        conditions: ``context`` (B, L, 4096) umT5 states; optionally ``clip_feature`` (CLIP image tokens),
        ``condition`` (image-to-video mask and frame latents) and ``first_frame`` (TI2V: the first latent frame,
        given clean, its tokens at timestep 0). The model sees the official 0..1000 timestep scale.
        """
        # Scaled in float64 on the CPU, then rounded once: a solver's integer timesteps (UniPC) stay exact.
        timesteps = (sigmas.detach().to("cpu", torch.float64) * 1000).to(latents.device, torch.float32)
        first = conditions.get("first_frame")
        if first is not None:
            latents = torch.cat([first.to(latents.dtype), latents[:, :, 1:]], dim=2)
            _, patch_h, patch_w = unwrap_model(model).config.patch_size
            frames, height, width = latents.shape[2:]
            per_token = timesteps[:, None, None, None].expand(-1, frames, height // patch_h, width // patch_w).clone()
            per_token[:, 0] = 0
            timesteps = per_token.flatten(1)
        return model(
            latents,
            timesteps,
            conditions["context"],
            clip_feature=conditions.get("clip_feature"),
            condition=conditions.get("condition"),
        )

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
        """See ``Pipeline.run_component``. umT5 on 512 tokens, CLIP on one image (FLF2V encodes its two one at a
        time), one DiT prediction through ``predict`` (either A14B expert: 512 context tokens, CLIP tokens and the
        image condition where the model takes them; TI2V as text-to-video) and the VAE's tiled decode."""
        from ds_models_wan.text_encoder import TEXT_MAX_LENGTH
        from ds_models_wan.vae import WanVAEConfig
        from ds_models_wan.vae22 import WanVAE22Config

        latent_frames = (frames - 1) // 4 + 1

        def noise(*shape: int) -> torch.Tensor:
            return torch.randn(1, *shape, device=device, dtype=torch.bfloat16)

        if name == "text_encoder":
            ids = torch.randint(0, module.config.vocab_size, (1, TEXT_MAX_LENGTH), device=device)
            return module(input_ids=ids)
        if name == "image_encoder":
            size = module.config.image_size
            return module(pixel_values=noise(3, size, size))
        if name in ("dit", "dit2"):
            config = unwrap_model(module).config
            vae = getattr(preset, "vae_config", "wan2.1")
            scale = (WanVAE22Config if vae == "wan2.2" else WanVAEConfig).preset(vae).spatial_compression
            shape = (latent_frames, height // scale, width // scale)
            conditions = {"context": noise(config.text_len, config.text_dim)}
            if config.has_image_input:
                tokens = config.clip_tokens * (2 if config.model_type == "flf2v" else 1)
                conditions["clip_feature"] = noise(tokens, config.clip_dim)
            if config.condition_dim:
                conditions["condition"] = noise(config.condition_dim, *shape)
            sigmas = torch.full((1,), 0.5, dtype=torch.float64)  # on the CPU, as predict scales it
            return cls.predict(module, noise(config.out_dim, *shape), sigmas, conditions)
        if name == "vae":
            scale = module.spatial_compression
            return module.decode(noise(module.z_dim, latent_frames, height // scale, width // scale), tiled=True)
        raise ValueError(f"{cls.__name__} has no model component {name!r}")

    def load_lora(
        self,
        path: str | os.PathLike,
        scale: float = 1.0,
        fuse: bool = False,
        name: str | None = None,
        expert: str = "all",
    ) -> str:
        """Apply a LoRA (kohya/ComfyUI, diffusers/peft or DiffSynth keys) to the DiT; see ``Pipeline.load_lora``.

        expert: ``"all"`` (every loaded DiT), ``"high_noise"`` (``dit``) or ``"low_noise"`` (``dit2``, A14B only).
        """
        for component in self._experts(expert):
            self.lora_model = component  # the instance attribute shadows the class's choice for this call
            try:
                name = super().load_lora(path, scale=scale, fuse=fuse, name=name)
            finally:
                del self.lora_model
        return name

    def clear_lora(self) -> None:
        for component in self._experts("all"):
            self.lora_model = component
            try:
                super().clear_lora()
            finally:
                del self.lora_model

    def _experts(self, expert: str) -> list[str]:
        choices = {"all": ["dit", "dit2"], "high_noise": ["dit"], "low_noise": ["dit2"]}
        if expert not in choices:
            raise ValueError(f"expert={expert!r}; use 'all', 'high_noise' or 'low_noise'")
        names = [name for name in choices[expert] if self._components.get(name) is not None]
        if not names:
            raise ValueError(f"expert={expert!r}: no such DiT is loaded (low_noise needs a Wan2.2 A14B pair)")
        return names

    # ------------------------------------------------------------------ steps
    @pipeline_step("text_encoder")
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """(1, 512, 4096) umT5 states, zero past the prompt's tokens, as the official T5 wrapper pads them."""
        from ds_models_wan.text_encoder import encode_prompt

        text = encode_prompt(self.text_encoder, self.tokenizer, [prompt], device=self.device)
        return text.to(self.device, self.torch_dtype)

    @pipeline_step("image_encoder")
    def encode_clip(self, images: list[torch.Tensor]) -> torch.Tensor:
        """CLIP tokens of each (1, 3, H, W) image in [-1, 1], concatenated along tokens: (1, 257 * n, 1280)."""
        from ds_models_wan.image_encoder import encode_image

        features = [encode_image(self.image_encoder, image.to(self.device, self.torch_dtype)) for image in images]
        return torch.cat(features, dim=1).to(self.torch_dtype)

    @pipeline_step("vae")
    def encode_video(self, video: torch.Tensor, tiled: bool = True, **tiling: object) -> torch.Tensor:
        """Video (1, 3, F, H, W) in [-1, 1] to normalised float32 latents (1, z, (F-1)/4+1, H/s, W/s)."""
        latents = self.vae.encode(video.to(self.device, self.torch_dtype), tiled=tiled, **tiling)
        return latents.float()

    @pipeline_step("dit")
    def denoise(self, state: _Sampling, steps: Sequence[int]) -> torch.Tensor:
        """Sampler steps ``steps`` with ``dit`` (the only DiT, or the A14B high-noise expert)."""
        return self._sample(self.dit, "dit", state, steps)

    @pipeline_step("dit2")
    def denoise_low_noise(self, state: _Sampling, steps: Sequence[int]) -> torch.Tensor:
        """Sampler steps ``steps`` with the A14B low-noise expert."""
        return self._sample(self.dit2, "dit2", state, steps)

    @pipeline_step("vae")
    def decode(self, latents: torch.Tensor, tiled: bool = True, **tiling: object) -> torch.Tensor:
        """Normalised latents to video (1, 3, F, H, W) in [-1, 1]."""
        return self.vae.decode(latents.to(self.device, self.torch_dtype), tiled=tiled, **tiling)

    def _sample(self, dit: torch.nn.Module, name: str, state: _Sampling, steps: Sequence[int]) -> torch.Tensor:
        scheduler = state.scheduler
        for index in self.progress(steps, desc=f"denoising ({name})"):
            scale = state.cfg_scale_high_noise if name == "dit" and self._components.get("dit2") else state.cfg_scale
            sigmas = torch.tensor([scheduler.model_timestep(index) / 1000], dtype=torch.float64)
            velocity = self._guided_velocity(dit, state, sigmas, scale)
            state.latents = scheduler.step(velocity, index, state.latents)
            if state.pinned is not None:
                state.latents[:, :, :1] = state.pinned
            self.check_finite(state.latents, index, len(scheduler.timesteps))
            if state.experts is not None:
                state.experts.append(name)
        return state.latents

    def _guided_velocity(
        self, dit: torch.nn.Module, state: _Sampling, sigmas: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        latents = state.latents.to(self.device, self.torch_dtype)
        conditions = {"clip_feature": state.clip_feature, "condition": state.condition, "first_frame": state.pinned}
        prediction = self.predict(dit, latents, sigmas, {"context": state.context, **conditions}).float()
        if state.negative is not None and cfg_scale != 1.0:
            unconditional = self.predict(dit, latents, sigmas, {"context": state.negative, **conditions}).float()
            prediction = unconditional + cfg_scale * (prediction - unconditional)
        return prediction

    # ------------------------------------------------------------------ the call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        cfg_scale: float | None = None,
        cfg_scale_high_noise: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        num_inference_steps: int | None = None,
        sigma_shift: float | None = None,
        sampler: str = "euler",
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        rand_device: str = "cpu",
        input_image: Image.Image | None = None,
        end_image: Image.Image | None = None,
        input_video: Sequence[Image.Image] | None = None,
        denoising_strength: float = 1.0,
        boundary: float | None = None,
        tiled: bool = True,
        tile_size: tuple[int, int] | None = None,
        tile_stride: tuple[int, int] | None = None,
    ) -> VideoFrames:
        """Generate a video: ``num_frames`` PIL frames (``VideoFrames``, with ``fps`` and ``parameters``).

        Options left as None take the loaded release's official values (a preset's sample_shift, guidance, size,
        frame count and steps: e.g. shift 12 and guidance 3/4 for T2V-A14B), otherwise cfg 5, shift 5, 480x832,
        81 frames, 50 steps; ``pipe.sampling_defaults`` holds them.

        cfg_scale: classifier-free guidance (one DiT pass per step when 1); cfg_scale_high_noise: the A14B
        high-noise expert's own scale (the official T2V-A14B pair is 3 low / 4 high; None: cfg_scale). The latents
        stay float32 between steps, as in the official loop; the DiT sees them in ``torch_dtype``. sigma_shift: the
        schedule's shift
        (the official sample_shift; FLF2V examples use 16, T2V-A14B 12). sampler: ``"euler"`` (flow matching) or
        ``"unipc"`` (the official FlowUniPCMultistepScheduler). The grid is the official one for both:
        ``linspace(0.999 * denoising_strength, 0, N + 1)[:-1]``, shifted, then 0. boundary: the A14B expert switch
        as a fraction of 1000 timesteps (default 0.875; 0.9 for image-to-video). tiled/tile_size/tile_stride: VAE
        tiling (see the VAE's ``encode``/``decode``; None keeps its defaults).
        """
        self.require("tokenizer", "text_encoder", "dit", "vae")
        dit, vae = self._components["dit"], self._components["vae"]
        # Unset options take the loaded release's official values (preset), else the generic Wan 2.1 ones.
        options = self.sampling_options(
            cfg_scale=cfg_scale,
            cfg_scale_high_noise=cfg_scale_high_noise,
            height=height,
            width=width,
            num_frames=num_frames,
            num_inference_steps=num_inference_steps,
            sigma_shift=sigma_shift,
        )
        cfg_scale, cfg_scale_high_noise, height, width, num_frames, num_inference_steps, sigma_shift = options.values()
        self._check_inputs(
            height, width, num_frames, sampler, boundary, denoising_strength, input_image, end_image, input_video
        )
        condition_channels = dit.config.in_dim - vae.z_dim
        tiling = {key: value for key, value in (("tile_size", tile_size), ("tile_stride", tile_stride)) if value}

        latent_frames = (num_frames - 1) // vae.temporal_compression + 1
        shape = (1, vae.z_dim, latent_frames, height // vae.spatial_compression, width // vae.spatial_compression)
        if noise is None:
            noise = self.generate_noise(shape, seed, rand_device=rand_device, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(
                f"noise has shape {tuple(noise.shape)}; {num_frames} frames of {height}x{width} need {shape}"
            )
        noise = noise.to(self.device, torch.float32)

        scheduler = SAMPLERS[sampler]("wan")
        scheduler.set_timesteps(num_inference_steps, denoising_strength=denoising_strength, sigma_shift=sigma_shift)
        context = self.encode_prompt(prompt)
        two_experts = self._components.get("dit2") is not None
        high_scale = cfg_scale if cfg_scale_high_noise is None or not two_experts else cfg_scale_high_noise
        negative = self.encode_prompt(negative_prompt) if (cfg_scale, high_scale) != (1.0, 1.0) else None
        state = _Sampling(noise, scheduler, context, negative, cfg_scale, high_scale, experts=[])
        self._prepare_inputs(state, num_frames, height, width, input_image, end_image, input_video, tiled, tiling)

        high, low = self._split_steps(scheduler, boundary, condition_channels > 0)
        if high:
            self.denoise(state, high)
        if low:
            self.denoise_low_noise(state, low)
        pixels = self.decode(state.latents, tiled, **tiling)
        self.load_models_to_device(())
        parameters = {
            "prompt": prompt,
            "negative_prompt": negative_prompt or None,
            "seed": seed,
            "steps": num_inference_steps,
            "cfg_scale": cfg_scale,
            "cfg_scale_high_noise": cfg_scale_high_noise,
            "sigma_shift": sigma_shift,
            "sampler": sampler,
            "size": f"{width}x{height}",
            "num_frames": num_frames,
            "fps": self.fps,
            "denoising_strength": denoising_strength if input_video is not None else None,
            "boundary": self._boundary(boundary, condition_channels > 0) if low else None,
            "model": self.model_name,
        }
        self.last_experts = state.experts
        return VideoFrames(tensor_to_images(pixels[0].transpose(0, 1)), fps=self.fps, parameters=parameters)

    # ------------------------------------------------------------------ helpers
    def _check_inputs(
        self,
        height: int,
        width: int,
        num_frames: int,
        sampler: str,
        boundary: float | None,
        denoising_strength: float,
        input_image: Image.Image | None,
        end_image: Image.Image | None,
        input_video: Sequence[Image.Image] | None,
    ) -> None:
        dit, vae = self._components["dit"], self._components["vae"]
        check_video_size(height, width, num_frames, vae.spatial_compression * dit.config.patch_size[1])
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is not supported; use {' or '.join(map(repr, SAMPLERS))}")
        if denoising_strength != 1.0 and input_video is None:
            raise ValueError("denoising_strength != 1 needs an input_video to start from; pass input_video=...")
        if boundary is not None and not 0 <= boundary <= 1:
            raise ValueError(f"boundary={boundary!r} must be in [0, 1] (a fraction of 1000 timesteps)")
        conditioned = dit.config.in_dim > vae.z_dim
        if conditioned and input_image is None:
            raise ValueError(f"this image-to-video DiT ({dit.config.model_type}) needs input_image=...")
        if input_image is not None and not conditioned and dit.config.model_type != "ti2v":
            raise ValueError(
                "input_image needs an image-to-video model (I2V, FLF2V or TI2V); this DiT is text-to-video"
            )
        if end_image is not None and not conditioned:
            raise ValueError("end_image needs a model conditioned on frames (I2V or FLF2V); this DiT takes none")
        if end_image is None and getattr(dit.config, "has_image_position_embedding", False):
            raise ValueError("this first-last-frame (FLF2V) DiT needs end_image=... besides input_image")
        if dit.config.has_image_input:
            self.require("image_encoder")

    def _prepare_inputs(
        self,
        state: _Sampling,
        num_frames: int,
        height: int,
        width: int,
        input_image: Image.Image | None,
        end_image: Image.Image | None,
        input_video: Sequence[Image.Image] | None,
        tiled: bool,
        tiling: dict,
    ) -> None:
        """CLIP tokens, the frame condition ``y``, V2V start latents and the TI2V pinned frame, as the model needs."""
        dit, vae = self._components["dit"], self._components["vae"]
        images = [_pixels(image, width, height) for image in (input_image, end_image) if image is not None]
        if dit.config.has_image_input:
            # FLF2V's img_emb takes both images' tokens; other I2V models the first image's only.
            use_both = getattr(dit.config, "has_image_position_embedding", False)
            state.clip_feature = self.encode_clip(images if use_both else images[:1])
        if dit.config.in_dim > vae.z_dim:
            last = images[1] if end_image is not None else None
            state.condition = self.frame_condition(images[0], last, num_frames, tiled, **tiling)
        if input_video is not None:
            video = _video_pixels(input_video, num_frames, width, height)
            start = self.encode_video(video, tiled, **tiling)
            state.latents = FlowMatchScheduler.add_noise(start, state.latents, state.scheduler.sigmas[0]).float()
        if dit.config.model_type == "ti2v" and input_image is not None:
            state.pinned = self.encode_video(images[0][:, :, None], tiled, **tiling)
            state.latents[:, :, :1] = state.pinned

    def _boundary(self, boundary: float | None, image_to_video: bool) -> float:
        if boundary is not None:
            return boundary
        if self.boundary is not None:
            return self.boundary
        return I2V_BOUNDARY if image_to_video else DEFAULT_BOUNDARY

    def _split_steps(
        self, scheduler: FlowMatchScheduler, boundary: float | None, image_to_video: bool
    ) -> tuple[list[int], list[int]]:
        """Step indices for ``dit`` and ``dit2``: the official rule, high-noise expert while t >= boundary * 1000."""
        steps = list(range(len(scheduler.timesteps)))
        if self._components.get("dit2") is None:
            return steps, []
        threshold = self._boundary(boundary, image_to_video) * 1000
        high = [index for index in steps if scheduler.model_timestep(index) >= threshold]
        return high, steps[len(high) :]

    def frame_condition(
        self,
        first: torch.Tensor,
        last: torch.Tensor | None,
        num_frames: int,
        tiled: bool = True,
        **tiling: object,
    ) -> torch.Tensor:
        """The official ``y``: 4 mask channels (1 on given frames) and the latents of [first, zeros..., (last)].

        ``first``/``last`` are (1, 3, H, W) in [-1, 1]; training builds the same condition from a clip's frames.

        The mask is at pixel-frame resolution with the first frame repeated 4 times, folded into 4 channels per
        latent frame, so latent frame 0 is all ones and (for FLF2V) the last latent frame's last channel is one.
        """
        _, _, height, width = first.shape
        frames = [first[:, :, None], first.new_zeros(1, 3, num_frames - 1 - (last is not None), height, width)]
        if last is not None:
            frames.append(last[:, :, None])
        latents = self.encode_video(torch.cat(frames, dim=2), tiled, **tiling)
        latent_frames, latent_h, latent_w = latents.shape[2:]
        mask = torch.zeros(1, num_frames, latent_h, latent_w, device=latents.device)
        mask[:, 0] = 1
        if last is not None:
            mask[:, -1] = 1
        mask = torch.cat([mask[:, :1].repeat(1, 4, 1, 1), mask[:, 1:]], dim=1)
        mask = mask.view(1, latent_frames, 4, latent_h, latent_w).transpose(1, 2)
        return torch.cat([mask, latents], dim=1).to(self.torch_dtype)


def _pixels(image: Image.Image, width: int, height: int) -> torch.Tensor:
    if image.size != (width, height):
        image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    return image_to_tensor(image)


def _video_pixels(video: Sequence[Image.Image], num_frames: int, width: int, height: int) -> torch.Tensor:
    if len(video) < num_frames:
        raise ValueError(f"input_video has {len(video)} frames; num_frames={num_frames} needs at least that many")
    frames = [_pixels(frame, width, height) for frame in list(video)[:num_frames]]
    return torch.stack(frames, dim=2)
