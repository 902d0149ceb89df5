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

from ds_loader.families import Preset
from ds_vram import VRAMConfig, enable_vram_management, get_vram_handle

from .lora import lora_layers, parse_lora, read_lora

__all__ = [
    "Pipeline",
    "PipelineStepError",
    "named_sources",
    "pipeline_step",
    "source_folder",
    "subfolder_sources",
    "unwrap_model",
]

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


def subfolder_sources(folder: Path, subfolders: Mapping[str, str]) -> dict[str, Path]:
    """The components a diffusers-style folder holds: ``subfolders`` maps a subfolder (``transformer``) to our
    component name (``dit``); absent subfolders are left out."""
    return {name: folder / sub for sub, name in subfolders.items() if (folder / sub).is_dir()}


def source_folder(source: object) -> Path:
    """The folder a tokenizer or processor source names (a path, or a ModelConfig, whose resolving may download)."""
    from ds_loader import ModelConfig

    paths = source.resolve() if isinstance(source, ModelConfig) else [Path(source)]
    first = Path(paths[0])
    return first if first.is_dir() else first.parent


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under DDP/FSDP/peft wrappers (they keep it in ``.module`` or ``.base_model.model``), for reading its
    config; calls still go through the wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "base_model") and hasattr(model.base_model, "model"):
            model = model.base_model.model
        else:
            return model


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
    required_components: ClassVar[tuple[str, ...]] = ()  # from_pretrained refuses to load without these
    lora_model: ClassVar[str] = "dit"  # the component LoRAs apply to
    # What an unset (None) __call__ option means; from_pretrained overlays a preset's own values per instance.
    default_options: ClassVar[Mapping[str, Any]] = {}
    family: ClassVar[str] = ""  # the id of the family this pipeline runs (``ds_loader.families``)
    preset_components: ClassVar[Mapping[str, str]] = {}  # a preset file component -> ours, where they differ
    second_components: ClassVar[Mapping[str, str]] = {}  # model_configs lists: a second DiT is this component
    folder_layout: ClassVar[str] = ""  # what a local model folder holds, for error messages

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
        self.preset: Preset | None = None
        self.model_name: str | None = None

    def sampling_options(self, **given: Any) -> dict[str, Any]:
        """``given`` with each None replaced by ``sampling_defaults``' value, in the order given."""
        return {name: self.sampling_defaults[name] if value is None else value for name, value in given.items()}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | None = None,
        *,
        model_configs: Mapping[str, object] | Iterable[object] | None = None,
        torch_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        vram: VRAMConfig | Mapping[str, VRAMConfig] | None = None,
        download_source: str | None = None,
        progress_bar: bool = True,
    ) -> Pipeline:
        """Load the pipeline from a preset name, a released model id, a local folder laid out like the release
        (official or diffusers layout), and/or ``model_configs`` (``ds_loader.ModelConfig``s or paths that replace or
        complete ``model``'s: a mapping by component, or a list named by detection).

        vram: one ``VRAMConfig`` for every model, or one per component name; None keeps models on ``device``.
        The preset is resolved once; its ``sampling`` options become this pipeline's call defaults.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        preset = cls.find_preset(model)
        sources = {**cls.component_sources(model, preset, download_source), **cls.named_sources(model_configs)}
        missing = [name for name in cls.required_components if name not in sources]
        if missing:
            raise ValueError(cls._missing_message(model, missing))
        components = cls.load_components(sources, device=device, torch_dtype=torch_dtype, vram=vram)
        options = cls.init_options(preset)
        pipe = cls(components, device=device, torch_dtype=torch_dtype, progress_bar=progress_bar, **options)
        pipe.preset = preset
        pipe.model_name = str(model) if model is not None else None
        if preset is not None:
            pipe.sampling_defaults.update({k: v for k, v in preset.sampling.items() if v is not None})
        pipe.configure(preset)
        return pipe

    @classmethod
    def find_preset(cls, model: object) -> Preset | None:
        """The preset ``model`` names (by name or released model id) in this pipeline's family, or None."""
        from ds_loader.families import get_family

        if not isinstance(model, str | os.PathLike) or Path(model).exists():
            return None
        return get_family(cls.family).get_preset(str(model))

    @classmethod
    def component_sources(cls, model: object, preset: Preset | None, download_source: str | None) -> dict[str, Any]:
        """Where each component comes from: the preset's ModelConfigs, or the files of a local folder."""
        if preset is not None:
            configs = preset.model_configs(download_source)
            return {cls.preset_components.get(name, name): config for name, config in configs.items()}
        if model is None:
            return {}
        path = Path(model)
        if not path.is_dir():
            raise ValueError(
                f"{path}: {cls.__name__} loads a preset, a model id or a model folder; for single files pass "
                "model_configs={component: path}"
            )
        return cls.folder_sources(path)

    @classmethod
    def folder_sources(cls, folder: Path) -> dict[str, Any]:
        """The components a local model folder holds (family-specific layout)."""
        raise NotImplementedError(f"{cls.__name__} does not load model folders")

    @classmethod
    def tokenizer_name(cls, folder: Path) -> str | None:
        """The tokenizer component a folder in a ``model_configs`` list is (None: not a tokenizer): by default a folder
        holding ``tokenizer_config.json`` is the ``tokenizer``; families with several tokenizers say which is which."""
        return "tokenizer" if (folder / "tokenizer_config.json").is_file() else None

    @classmethod
    def named_sources(cls, model_configs: Mapping[str, object] | Iterable[object] | None) -> dict[str, Any]:
        """Component names for ``model_configs``: a mapping as given; a list by the family's detection specs."""
        from ds_loader.families import get_family

        family = get_family(cls.family)
        return named_sources(
            model_configs, family.component_specs, family.title, cls.tokenizer_name, second=cls.second_components
        )

    @classmethod
    def load_components(
        cls,
        sources: Mapping[str, Any],
        *,
        device: torch.device,
        torch_dtype: torch.dtype,
        vram: VRAMConfig | Mapping[str, VRAMConfig] | None,
    ) -> dict[str, Any]:
        """Load the models and tokenizers of ``sources`` (family-specific)."""
        raise NotImplementedError

    @classmethod
    def init_options(cls, preset: Preset | None) -> dict[str, Any]:
        """Keyword arguments of ``__init__`` that come from the preset (Wan: its fps)."""
        return {}

    def configure(self, preset: Preset | None) -> None:
        """Settings a preset gives the loaded pipeline beyond its call options (Wan: the expert boundary)."""

    @classmethod
    def _missing_message(cls, model: object, missing: list[str]) -> str:
        from ds_loader.families import get_family

        where = "pass a preset, a model folder, or model_configs for them"
        if model is not None and Path(model).is_dir():
            folder = Path(model)
            held = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
            shown = ", ".join(held[:10]) + (f" and {len(held) - 10} more" if len(held) > 10 else "")
            title = get_family(cls.family).title if cls.family else cls.__name__
            layout = f"; a {title} model folder holds {cls.folder_layout}" if cls.folder_layout else ""
            return (
                f"{folder}: no files for {', '.join(missing)} in this folder (it holds: {shown or 'nothing'})"
                f"{layout}; or pass model_configs for them"
            )
        return f"{cls.__name__}.from_pretrained: no source for {', '.join(missing)}; {where}"

    @staticmethod
    def predict(model: nn.Module, latents: torch.Tensor, sigmas: torch.Tensor, conditions: Mapping[str, Any]) -> Any:
        """The family's one DiT call: the flow-matching velocity for ``latents`` at noise levels ``sigmas`` (B,) in
        [0, 1] given ``conditions``; sampling and training both use it."""
        raise NotImplementedError

    @classmethod
    def run_component(
        cls,
        name: str,
        module: nn.Module,
        *,
        height: int,
        width: int,
        frames: int,
        device: torch.device,
        preset: Preset | None,
    ) -> object:
        """Run one component (``name``: ours, as in ``component_names``) as a generation of ``height`` x ``width``
        (``frames``: 1 for images) would, on random bf16 inputs on ``device``, for the memory benchmark
        (``benchmarks/memory.py``). Only its peak memory matters; the output is returned so it stays alive."""
        raise NotImplementedError(
            f"{cls.__name__} does not define run_component, so benchmarks/memory.py cannot measure its {name!r}; "
            "write it next to predict (the inputs of each model at a generation's size)"
        )

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

    def check_finite(self, latents: torch.Tensor, index: int, total: int) -> None:
        """Stop sampling when a step produced NaN or Inf, instead of decoding it into a black image."""
        if bool(torch.isfinite(latents).all()):
            return
        dtype = str(self.torch_dtype).removeprefix("torch.")
        model = self._components.get(self.lora_model)
        loras = get_vram_handle(model) if isinstance(model, nn.Module) else None
        names = list(loras.lora_names) if loras is not None else []
        cause = f"a broken LoRA ({', '.join(names)})" if names else "a broken or mismatched checkpoint"
        raise FloatingPointError(
            f"sampling step {index + 1} of {total} produced non-finite latents (NaN or Inf); likely causes: a {dtype} "
            f"overflow (try torch_dtype=torch.bfloat16 or float32), {cause}, or a non-finite option (cfg_scale, "
            "LoRA scale); nothing was saved"
        )

    def progress(self, iterable: Iterable, **kwargs: Any) -> Iterable:
        return tqdm(iterable, disable=not self.progress_bar, **kwargs)

    # ------------------------------------------------------------------ LoRA
    def lora_targets(self) -> Callable[[str], object] | None:
        """The family's map from foreign (diffusers) module names to our layers (its descriptor's LoRA naming);
        None when the pipeline belongs to no registered family and names must already match."""
        from ds_loader.families import get_family

        return get_family(self.family).lora.from_diffusers if self.family else None

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
