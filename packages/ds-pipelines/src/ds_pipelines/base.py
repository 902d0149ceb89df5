"""The pipeline framework: components, device and dtype, seeds, and model moves driven by step declarations.

A pipeline is a few named steps (encode the prompt, prepare latents, denoise, decode), each a method marked
``@pipeline_step("model", ...)`` with the components it uses. Before a step runs, the framework offloads every
memory-managed model the step does not use and lets the declared ones onload, so no step frees memory by
hand, and training can run the same steps. A step that reaches for a component it did not declare fails
loudly instead of silently pulling a model onto the device.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from ds_vram import VRAMConfig, enable_vram_management, get_vram_handle

from .lora import lora_layers, parse_lora, read_lora

__all__ = ["Pipeline", "PipelineStepError", "named_sources", "pipeline_step"]

Method = TypeVar("Method", bound=Callable[..., Any])


class PipelineStepError(RuntimeError):
    """A step used a component it did not declare."""


@dataclass(frozen=True)
class _ActiveStep:
    name: str
    models: tuple[str, ...]


def named_sources(
    model_configs: Mapping[str, object] | Iterable[object] | None,
    spec_components: Mapping[str, str],
    family: str,
    tokenizer_name: Callable[[Path], str | None],
    second: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """Component names for a pipeline's ``model_configs``: a mapping is taken as it is; in a list, a tokenizer
    folder is named by ``tokenizer_name`` (None: not a tokenizer) and a model file by detection (headers only),
    through ``spec_components`` (spec name -> component). ``second`` names a component's second occurrence
    (Wan: a second DiT is the A14B low-noise expert, ``{"dit": "dit2"}``, as upstream orders them)."""
    if model_configs is None:
        return {}
    if isinstance(model_configs, Mapping):
        return dict(model_configs)
    from ds_loader import ModelConfig, detect

    sources: dict[str, object] = {}
    for source in model_configs:
        paths = source.resolve() if isinstance(source, ModelConfig) else [Path(source)]
        tokenizer = tokenizer_name(Path(paths[0])) if len(paths) == 1 and Path(paths[0]).is_dir() else None
        if tokenizer is not None:
            sources[tokenizer] = paths[0]
            continue
        names = {spec_components.get(match.spec.name) for match in detect(paths)} - {None}
        if len(names) != 1:
            raise ValueError(
                f"model_configs entry {source}: expected one {family} component, detected "
                f"{sorted(names) or 'none'}; pass model_configs as a mapping to say which"
            )
        name = names.pop()
        if name in sources and second and name in second:
            name = second[name]
        sources[name] = source
    return sources


def pipeline_step(*models: str) -> Callable[[Method], Method]:
    """Declare a pipeline method as a step that uses ``models`` (component names)."""

    def decorate(method: Method) -> Method:
        @functools.wraps(method)
        def run(self: Pipeline, *args: Any, **kwargs: Any) -> Any:
            with self._step(method.__name__, models):
                return method(self, *args, **kwargs)

        run.step_models = models  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate


class Pipeline:
    """Components by name, the device and dtype of intermediate tensors, seeds and progress bars.

    Subclasses list their components in ``component_names`` (models and tokenizers; ``None`` for an optional
    one that is absent) and define their steps with ``@pipeline_step``.
    """

    component_names: ClassVar[tuple[str, ...]] = ()
    lora_model: ClassVar[str] = "dit"  # the component LoRAs apply to
    # What an unset (None) __call__ option means; from_pretrained overlays a preset's own values per instance.
    default_options: ClassVar[Mapping[str, Any]] = {}

    def __init__(
        self,
        components: Mapping[str, Any],
        *,
        device: torch.device | str = "cpu",
        torch_dtype: torch.dtype = torch.bfloat16,
        progress_bar: bool = True,
    ):
        unknown = set(components) - set(self.component_names)
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no component(s) {sorted(unknown)}; "
                f"known: {', '.join(self.component_names)}"
            )
        self._components: dict[str, Any] = {name: components.get(name) for name in self.component_names}
        self._active: _ActiveStep | None = None
        self.device = torch.device(device)
        self.torch_dtype = torch_dtype
        self.progress_bar = progress_bar
        self.sampling_defaults: dict[str, Any] = dict(self.default_options)

    def sampling_options(self, **given: Any) -> dict[str, Any]:
        """``given`` with each None replaced by ``sampling_defaults``' value, in the order given."""
        return {name: self.sampling_defaults[name] if value is None else value for name, value in given.items()}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_models(
        cls,
        sources: Mapping[str, Any],
        specs: Mapping[str, Any],
        *,
        required: Iterable[str],
        device: torch.device,
        torch_dtype: torch.dtype,
        vram: VRAMConfig | Mapping[str, VRAMConfig] | None,
    ) -> dict[str, nn.Module]:
        """Load each model of ``specs`` (component -> ds-loader spec, None: detected) that has a source, with its
        ``vram`` config (one for all, or one per component); ``required`` components without a source are named
        in one error before anything loads."""
        from ds_loader import load_model

        missing = [name for name in required if name not in sources]
        if missing:
            raise ValueError(
                f"{cls.__name__}.from_pretrained: no source for {', '.join(missing)}; pass a preset, a model "
                "folder, or model_configs for them"
            )
        models: dict[str, nn.Module] = {}
        for name, spec in specs.items():
            if name in sources:
                config = vram.get(name) if isinstance(vram, Mapping) else vram
                models[name] = load_model(
                    sources[name], device=device, torch_dtype=torch_dtype, vram=config, spec=spec
                )
        return models

    # ------------------------------------------------------------------ components
    def __getattr__(self, name: str) -> Any:
        components = self.__dict__.get("_components", {})
        if name not in components:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        active = self.__dict__.get("_active")
        component = components[name]
        if active is not None and isinstance(component, nn.Module) and name not in active.models:
            raise PipelineStepError(
                f"step {active.name!r} uses {name!r} without declaring it; add it to @pipeline_step(...)"
            )
        return component

    @property
    def models(self) -> dict[str, nn.Module]:
        return {name: c for name, c in self._components.items() if isinstance(c, nn.Module)}

    def require(self, *names: str) -> None:
        """Fail early, naming what to load, when a component a call needs is absent."""
        missing = [name for name in names if self._components.get(name) is None]
        if missing:
            raise ValueError(f"{type(self).__name__} needs {', '.join(missing)} for this call, but it was not loaded")

    # ------------------------------------------------------------------ model moves
    @contextmanager
    def _step(self, name: str, models: tuple[str, ...]) -> Iterator[None]:
        if self._active is not None:  # a step calling another step runs inside the outer declaration
            outer = self._active
            self._active = _ActiveStep(outer.name, tuple(dict.fromkeys(outer.models + models)))
            try:
                yield
            finally:
                self._active = outer
            return
        self.load_models_to_device(models)
        self._active = _ActiveStep(name, models)
        try:
            yield
        finally:
            self._active = None

    def load_models_to_device(self, names: Iterable[str]) -> None:
        """Offload every managed model not in ``names``, then onload those in ``names``.

        Only models under ds-vram management move; an unmanaged model stays where the user put it.
        """
        names = set(names)
        for name, model in self.models.items():
            handle = get_vram_handle(model)
            if handle is not None and name not in names:
                handle.offload()
        for name in names:
            model = self._components.get(name)
            handle = get_vram_handle(model) if isinstance(model, nn.Module) else None
            if handle is not None:
                handle.onload()

    # ------------------------------------------------------------------ randomness and progress
    def generate_noise(
        self,
        shape: tuple[int, ...],
        seed: int | None = None,
        *,
        rand_device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Gaussian noise drawn in float32 on ``rand_device`` (CPU: the same seed gives the same image anywhere),
        returned on the pipeline's device in ``dtype`` (default: the pipeline's ``torch_dtype``)."""
        if generator is None:
            generator = torch.Generator(rand_device)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        noise = torch.randn(shape, generator=generator, device=rand_device, dtype=torch.float32)
        return noise.to(device=self.device, dtype=dtype or self.torch_dtype)

    def progress(self, iterable: Iterable, **kwargs: Any) -> Iterable:
        return tqdm(iterable, disable=not self.progress_bar, **kwargs)

    # ------------------------------------------------------------------ LoRA
    def lora_targets(self) -> Callable[[str], object] | None:
        """The family's map from foreign (diffusers) module names to our layers; None when names already match."""
        return None

    def load_lora(
        self, path: str | os.PathLike, scale: float = 1.0, fuse: bool = False, name: str | None = None
    ) -> str:
        """Apply a LoRA file (kohya/ComfyUI, diffusers/peft, BFL or DiffSynth keys) to ``lora_model``.

        Hot-loaded by default: the adapter is added to layer outputs, so it works with every VRAM setting,
        stacks with others and is removed by ``clear_lora``. ``fuse=True`` adds ``scale * up @ down`` into
        the weights instead (no runtime cost, not removable; needs weights not managed by ds-vram).
        Returns the adapter's name.
        """
        model = self._components.get(self.lora_model)
        if model is None:
            raise ValueError(f"load_lora needs the {self.lora_model!r} component, which is not loaded")
        pieces, unknown = parse_lora(read_lora(path))
        layers, unmatched = lora_layers(pieces, model, self.lora_targets())
        if not layers:
            sample = ", ".join(list(pieces)[:3] + unknown[:3])
            raise ValueError(f"{path}: no LoRA layer fits {type(model).__name__} (first keys: {sample})")
        skipped = unmatched + unknown
        if skipped:
            warnings.warn(
                f"{path}: {len(skipped)} LoRA entries match no layer of {type(model).__name__} and are "
                f"ignored (first: {', '.join(skipped[:3])})",
                stacklevel=2,
            )
        name = name or Path(path).stem
        if fuse:
            self._fuse_lora(model, layers, scale, path)
            return name
        handle = get_vram_handle(model)
        if handle is None:
            # Manage the model where it is, in its dtype: nothing moves, and adapters can be hot-loaded.
            parameter = next(model.parameters())
            handle = enable_vram_management(
                model,
                VRAMConfig(storage="device", computation_device=parameter.device, computation_dtype=parameter.dtype),
            )
        handle.add_lora(name, layers, scale)
        return name

    @staticmethod
    def _fuse_lora(model: nn.Module, layers: dict, scale: float, path: object) -> None:
        if get_vram_handle(model) is not None:
            raise ValueError(
                f"{path}: fuse=True needs weights outside ds-vram; use fuse=False (hot-loading) with VRAM management"
            )
        with torch.no_grad():
            for layer_name, (down, up) in layers.items():
                weight = model.get_submodule(layer_name).weight
                delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * scale
                weight.add_(delta.to(weight.dtype))

    def clear_lora(self) -> None:
        """Remove every hot-loaded LoRA (fused ones are part of the weights and stay)."""
        model = self._components.get(self.lora_model)
        handle = get_vram_handle(model) if model is not None else None
        for name in handle.lora_names if handle is not None else []:
            handle.remove_lora(name)
