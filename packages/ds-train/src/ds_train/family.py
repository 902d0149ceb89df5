"""Training adapters: the few things a training loop must know about a model family, and how a run finds its own.

An adapter loads the family's pipeline, encodes prompts and images with the pipeline's own steps (so training
sees exactly what sampling sees), runs the trainable model through the pipeline's prediction step, names the default
LoRA targets and the blocks to checkpoint, chooses how sigmas are sampled and losses weighted, and makes and saves
samples. Everything else (data, optimisation, checkpoints) is family-independent.

Each family names its adapter in its registry descriptor (``training_adapter="ds_train.flux:FluxTrainingAdapter"``);
this module names no family. An adapter declares the settings it takes in ``options`` (name -> ``(type, help)``):
``TrainingConfig.family_options`` fills them, and the CLI makes one flag of each.

A sample may carry extra images besides its target (``ds_train.data.EXTRA_IMAGE_ROLES``: edit images, a control
image, an inpaint mask). An adapter that trains on them accepts their roles in ``check_extras`` and encodes them in
``encode_extras`` (conditions from the images) and ``encode_sample_prompt`` (where the text encoder sees them, as an
edit model's vision-language encoder does). The defaults refuse extras and encode the prompt alone, so families
that train on prompt and image only need none of this.
"""

from __future__ import annotations

import math
import os
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "FamilyOption",
    "TrainingAdapter",
    "adapter_for",
    "declared_family_options",
    "family_of_model",
    "get_adapter",
    "parse_option_value",
]


class TrainingAdapter:
    """The family hook. Conditions and latents are dicts/tensors with the batch on dim 0, so they can be cached."""

    family: ClassVar[str] = ""  # the registry id of the family this adapter trains
    # The settings __init__ takes besides sigma_shift: name -> (type, help). A type is bool, int, float, str or a
    # typing.Literal of strings; the CLI makes a flag of each (``--first-frame-conditioning``).
    options: ClassVar[Mapping[str, tuple[Any, str]]] = {}
    trainable_model: ClassVar[str] = "dit"  # the component LoRA attaches to
    default_lora_targets: ClassVar[tuple[str, ...]] = ()
    default_timestep_sampling: ClassVar[str] = "uniform"
    default_loss_weighting: ClassVar[str] = "none"
    default_num_frames: ClassVar[int | None] = None  # None: the family trains on images
    temporal_compression: ClassVar[int] = 1  # clips hold 1 + k * this many frames
    encoders: ClassVar[tuple[str, ...]] = ()  # components only needed to encode or sample (freed when caching)
    # Condition keys whose length differs between samples (dim 0 without the batch: prompt tokens); a batch pads
    # them with zeros (False for masks) to its longest. The adapter's mask must hide the padding.
    ragged_conditions: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, sigma_shift: float | None = None):
        self.sigma_shift = sigma_shift  # None: the family schedule's own shift

    @property
    def descriptor(self) -> Any:
        """The family's registry entry (``ds_pipelines.FamilyDescriptor``)."""
        from ds_pipelines import get_family

        return get_family(self.family)

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) when the config leaves them unset: the family's own."""
        return tuple(self.descriptor.default_size)

    def load_pipeline(self, model: Any, device: torch.device, dtype: torch.dtype, vram: Any = None) -> Any:
        """The family's pipeline from a preset, model id, local folder or ``{component: source}`` mapping."""
        pipeline = self.descriptor.pipeline_class()
        options = dict(device=device, torch_dtype=dtype, vram=vram, progress_bar=False)
        if isinstance(model, Mapping):
            return pipeline.from_pretrained(model_configs=model, **options)
        return pipeline.from_pretrained(model, **options)

    def check(self, pipe: Any, height: int, width: int, num_frames: int | None) -> None:
        """Raise a ``ValueError`` naming the setting at fault when the loaded model cannot train at this shape."""

    def encode_prompts(self, pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_extras(self, pipe: Any, roles: Collection[str]) -> None:
        """Raise a ``ValueError`` when the dataset's extra image roles (``edit_image``, ``control_image``,
        ``inpaint_mask``) are not what this model trains on, or one it needs is missing. The default takes none: a
        column the model would ignore is an error rather than a silent no-op."""
        if roles:
            raise ValueError(
                f"the dataset has {', '.join(sorted(roles))} columns, but {self.family or 'this family'} trains on a "
                "prompt and an image only; remove those columns or train a model that takes them"
            )

    def encode_sample_prompt(
        self, pipe: Any, prompt: str, extras: Mapping[str, list[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """One sample's prompt conditions (batch 1), given its extra images (``ds_train.data.ExtraImages``).

        The default encodes the prompt alone. Edit models override it: their text encoder sees the edit images.
        Caption dropout then replaces a sample's prompt conditions with this hook's result for ``""`` and the same
        images (``prompt_depends_on``), so a dropped caption is the empty instruction on these images, as the
        negative prompt is at sampling, not a prompt that has never seen them."""
        return self.encode_prompts(pipe, [prompt])

    def prompt_depends_on(self, extras: Mapping[str, list[torch.Tensor]]) -> bool:
        """Whether ``encode_sample_prompt`` reads these extra images (then the empty prompt of caption dropout is
        encoded per sample, with them; otherwise once for the dataset)."""
        return False

    def encode_extras(
        self,
        pipe: Any,
        pixels: torch.Tensor,
        latents: torch.Tensor,
        extras: Mapping[str, list[torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Conditions from a sample's extra images (batch 1; ``pixels`` and ``latents`` are the target's, as in
        ``encode_pixel_conditions``): an edit model's reference latents, a ControlNet's control latents and mask.
        Caption dropout leaves them alone; caching stores them. Called only when the sample has extras."""
        return {}

    def encode_images(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_pixel_conditions(
        self, pipe: Any, pixels: torch.Tensor, latents: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Conditions taken from the sample itself (an image-to-video model's first frame), given its pixels and
        the latents ``encode_images`` made of them; caption dropout leaves them alone."""
        return {}

    def sequence_length(self, latents: torch.Tensor) -> int:
        raise NotImplementedError

    def loss_mask(self, conditions: dict[str, torch.Tensor], latents: torch.Tensor) -> torch.Tensor | None:
        """Which latent values the loss counts (broadcastable to ``latents``); None: all of them."""
        return None

    def estimated_tokens(self, pipe: Any, height: int, width: int, num_frames: int | None) -> int:
        """Tokens one sample puts through the trained model (for the memory estimate)."""
        raise NotImplementedError

    def predict(
        self, model: nn.Module, noisy: torch.Tensor, sigmas: torch.Tensor, conditions: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The model's velocity for ``noisy`` latents at ``sigmas`` (B,): the family pipeline's ``predict`` step,
        the one sampling uses, given the conditions training adds (FLUX.1's guidance)."""
        return self.descriptor.pipeline_class().predict(model, noisy, sigmas, conditions)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The repeated blocks gradient checkpointing wraps."""
        raise NotImplementedError

    def random_inputs(
        self,
        model: nn.Module,
        batch: int,
        latent_size: tuple[int, int],
        latent_frames: int | None = None,
        text_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Random float32 latents (``latent_size`` = (height, width) in latent pixels, ``latent_frames`` for video
        families) and conditions (``text_tokens`` prompt tokens, None: the family's usual length) of the shapes
        ``predict`` feeds ``model``: for benchmarks and tests that run the trained model without its encoders."""
        raise NotImplementedError

    def sample(
        self,
        pipe: Any,
        prompt: str,
        seed: int,
        height: int,
        width: int,
        steps: int,
        num_frames: int | None = None,
        reference: torch.Tensor | None = None,
        extras: Mapping[str, list[torch.Tensor]] | None = None,
    ) -> Any:
        """One sample during training; ``reference`` is a dataset item's pixels (image-to-video models start from
        its first frame), ``extras`` its extra images (passed only when it has some: edit models edit them). The
        default is a plain text-to-image call, which image families need not override."""
        return pipe(prompt, seed=seed, height=height, width=width, num_inference_steps=steps)

    def save_sample(self, result: Any, stem: Path) -> Path:
        path = stem.with_suffix(".png")
        result.save(path)
        return path

    def scheduler(self, pipe: Any) -> Any:
        raise NotImplementedError

    def sigma_range(self, pipe: Any) -> tuple[float, float] | None:
        """The noise levels this run trains at (None: all of them)."""
        return None

    def sample_sigmas(
        self, pipe: Any, latents: torch.Tensor, generator: torch.Generator, sampling: str
    ) -> torch.Tensor:
        return self.scheduler(pipe).training_sigmas(
            latents.shape[0],
            generator=generator,
            image_sequence_length=self.sequence_length(latents),
            sampling=sampling,
            shift=self.sigma_shift,
            sigma_range=self.sigma_range(pipe),
        )

    def loss_weight(self, sigmas: torch.Tensor, weighting: str) -> torch.Tensor:
        if weighting == "none":
            return torch.ones_like(sigmas, dtype=torch.float32)
        if weighting == "bell":
            from ds_pipelines.schedulers import FlowMatchScheduler

            return FlowMatchScheduler.training_weight(sigmas)
        raise ValueError(f"loss_weighting={weighting!r}; use 'none' or 'bell'")


@dataclass(frozen=True)
class FamilyOption:
    """One setting some families' adapters take: its type (bool, int, float, str or a ``Literal`` of strings), help,
    and the ids of the families that take it."""

    name: str
    type: Any
    help: str
    families: tuple[str, ...]

    @property
    def choices(self) -> tuple[Any, ...] | None:
        return typing.get_args(self.type) if typing.get_origin(self.type) is typing.Literal else None


def declared_family_options() -> dict[str, FamilyOption]:
    """Every option any installed family's adapter declares, by name. One name declared with two different types
    is an error (a flag or a config key must mean one thing); a family whose adapter does not import is skipped."""
    from ds_pipelines import list_families

    found: dict[str, FamilyOption] = {}
    for descriptor in list_families():
        try:
            adapter = descriptor.training_adapter_class()
        except ImportError:
            continue  # its own dependencies are missing; it cannot train, so it adds no options
        for name, (kind, text) in adapter.options.items():
            known = found.get(name)
            if known is not None and known.type != kind:
                raise TypeError(
                    f"family option {name!r} is {_type_name(known.type)} for {', '.join(known.families)} but "
                    f"{_type_name(kind)} for {descriptor.id}; one name must have one type (rename one of them)"
                )
            families = (*known.families, descriptor.id) if known else (descriptor.id,)
            found[name] = FamilyOption(name, kind, known.help if known else text, families)
    return found


def parse_option_value(kind: Any, text: str) -> Any:
    """A command-line string as a value of an option's declared type; ``ValueError`` saying what is accepted."""
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not a boolean; use true or false")
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    if choices is not None:
        if text not in choices:
            raise ValueError(f"{text!r}; use one of {', '.join(map(str, choices))}")
        return text
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a {_type_name(kind)}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _type_name(kind: Any) -> str:
    choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    if choices is not None:
        return "one of " + ", ".join(map(repr, choices))
    return getattr(kind, "__name__", str(kind))


def _accepts(kind: Any, value: Any) -> bool:
    if typing.get_origin(kind) is typing.Literal:
        return value in typing.get_args(kind)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _checked_options(descriptor: Any, adapter: type[TrainingAdapter], options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` without None values (None keeps an option's default), each a declared option of its type."""
    accepted = ", ".join(adapter.options) or "none"
    checked = {}
    for name, value in options.items():
        if name not in adapter.options:
            raise ValueError(
                f"family option {name!r} is not one {descriptor.title} ({descriptor.id!r}) takes; it takes: {accepted}"
            )
        if value is None:
            continue
        kind = adapter.options[name][0]
        if not _accepts(kind, value):
            raise ValueError(f"family option {name}={value!r} ({descriptor.id}) must be {_type_name(kind)}")
        checked[name] = value
    return checked


def get_adapter(family: str, sigma_shift: float | None = None, **options: Any) -> TrainingAdapter:
    """The training adapter of a registered family (by id), given its declared ``options``."""
    from ds_pipelines import get_family

    descriptor = get_family(family)
    adapter = descriptor.training_adapter_class()
    return adapter(sigma_shift=sigma_shift, **_checked_options(descriptor, adapter, options))


def family_of_model(model: Any) -> str:
    """The family id of a preset, model id, local folder or file, or ``{component: source}`` mapping (by its DiT,
    else its first source with a path or model id). ``ValueError`` naming the model when no family recognises it."""
    from ds_pipelines import family_for

    if isinstance(model, Mapping):
        candidates = []
        for source in [model.get("dit"), *model.values()]:
            for value in (getattr(source, "path", source), getattr(source, "model_id", None)):
                value = value[0] if isinstance(value, list | tuple) and value else value
                if isinstance(value, str | os.PathLike):
                    candidates.append(value)
        if not candidates:
            raise ValueError(f"cannot tell the family of {dict(model)!r}; set TrainingConfig.family")
        model = candidates[0]
    return family_for(model).id


def adapter_for(config: Any) -> TrainingAdapter:
    """The adapter a ``TrainingConfig`` asks for: its ``family`` (None: recognised from ``model``), with its
    ``sigma_shift`` and ``family_options``."""
    if config.family is None:
        return get_adapter(family_of_model(config.model), sigma_shift=config.sigma_shift, **config.family_options)
    from ds_pipelines import get_family

    try:
        get_family(config.family)
    except ValueError as error:  # names the installed families
        raise ValueError(f"TrainingConfig.family={config.family!r}: {error}") from None
    return get_adapter(config.family, sigma_shift=config.sigma_shift, **config.family_options)
