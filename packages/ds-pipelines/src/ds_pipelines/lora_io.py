"""Writing LoRA files in the formats the field reads: ComfyUI, kohya and diffusers, with alpha and metadata.

A LoRA here is ``{layer: (down (r, in), up (out, r), alpha)}`` on a model's own layer names (for FLUX.1, BFL
names such as ``double_blocks.0.img_attn.qkv``; for Wan, the official Wan-Video names such as
``blocks.0.self_attn.q``); its weight delta is ``alpha / r * up @ down``. Families are the registered ones
(``ds_loader.families``): each descriptor's ``LoraNaming`` says how its names read in the diffusers and kohya
conventions and what ``ss_*`` metadata its trainers write. Readers guess the family from the file's layer names when
none is given (``guess_lora_family``).

- ``comfyui``: ``diffusion_model.<layer>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``.
- ``kohya``: the same tensors under flat names ``lora_unet_<layer with dots as underscores>`` (as musubi-tuner
  writes Wan LoRAs).
- ``diffusers``: ``transformer.<diffusers module>.lora_A.weight`` / ``lora_B.weight`` on the family's diffusers
  names; a fused layer (FLUX.1 q/k/v) becomes one entry per part, sharing ``lora_A``. diffusers/peft files carry
  no alpha tensors, so ``alpha / r`` is folded into ``lora_B``, and the ``lora_adapter_metadata`` diffusers reads
  (peft's LoraConfig) says alpha = rank for every module: diffusers, peft and we apply the same delta. The
  trained alpha is still recorded in the ``ss_*`` metadata.

Metadata follows kohya's ``ss_*`` keys and the Stability ``modelspec.*`` keys (base model, rank, alpha, trigger
words, steps, resolution), which LoRA browsers and ComfyUI managers show. Files are written atomically.
"""

from __future__ import annotations

import datetime
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ds_loader.families import LoraNaming, get_family, list_families

from .lora import (
    _PREFIXES,
    _SUFFIX,
    ADAPTER_METADATA_KEY,
    KOHYA_PREFIX,
    LoraPiece,
    lora_layers,
    parse_lora,
    read_lora,
)

__all__ = [
    "FORMATS",
    "LoraWeights",
    "convert_lora_file",
    "guess_lora_family",
    "lora_families",
    "lora_metadata",
    "merge_lora_files",
    "read_lora_layers",
    "save_lora_file",
]

FORMATS = ("comfyui", "kohya", "diffusers")
LoraWeights = dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # layer -> (down, up, alpha)


def lora_families() -> tuple[str, ...]:
    """The ids of the families whose LoRA files can be read and written (every registered family)."""
    return tuple(family.id for family in list_families())


def _naming(family: str) -> LoraNaming:
    try:
        return get_family(family).lora
    except ValueError:
        raise ValueError(f"LoRA family {family!r}; use one of {', '.join(lora_families())}") from None


def lora_metadata(
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    *,
    family: str | None = None,
    base_model: str = "",
    steps: int | str | None = None,
    trigger_words: Iterable[str] | str = (),
    resolution: str = "",
    title: str = "",
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """``ss_*`` and ``modelspec.*`` metadata describing ``layers`` (rank and alpha taken from the tensors); the
    network module, base model version and architecture are ``family``'s (generic values when None)."""
    ranks = sorted({int(down.shape[0]) for down, _, _ in layers.values()})
    alphas = sorted({float(alpha) for _, _, alpha in layers.values()})
    rank = str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks)
    alpha = _number(alphas[0]) if len(alphas) == 1 else json.dumps(alphas)
    words = [trigger_words] if isinstance(trigger_words, str) else [w for w in trigger_words if w]
    generic = {"ss_network_module": "networks.lora", "ss_base_model_version": family or ""}
    generic["modelspec.architecture"] = f"{family}/lora" if family else ""
    named = dict(_naming(family).metadata) if family is not None else {}
    metadata = {
        **generic,
        **named,
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_sd_model_name": base_model,
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.title": title or "LoRA",
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.trigger_phrase": ", ".join(words),
        "modelspec.resolution": resolution,
        "modelspec.base_model": base_model,
        "ds.rank": rank,
        "ds.alpha": alpha,
    }
    if steps is not None:
        metadata["ss_steps"] = metadata["ss_max_train_steps"] = str(steps)
    if resolution:
        metadata["ss_resolution"] = f"({resolution.replace('x', ',')})"
    for key, value in (extra or {}).items():
        metadata[key] = str(value)
    return {key: value for key, value in metadata.items() if value != ""}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def guess_lora_family(source: str | os.PathLike | Mapping[str, object] | Iterable[str]) -> str:
    """The id of the registered family a LoRA is for, from its layer names alone.

    ``source`` is a LoRA file, a state dict or ``parse_lora`` pieces (a mapping), or key names. Each family's
    ``LoraNaming.sign`` recognises its block-level names in any convention. Families may share names (FLUX.1's and
    Qwen-Image's diffusers attention layers are spelled alike), so the family that recognises the most of the
    file's layers wins; a tie at the top, or no family, raises ValueError (pass ``family=`` then).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix == ".safetensors" and path.is_file():
            from ds_vram import read_safetensors_header

            names: Iterable[str] = read_safetensors_header(path)[0]
        else:
            names = read_lora(path)
    else:
        names = source
    modules = {_module_name(str(name)) for name in names}
    counts = {family.id: sum(family.lora.recognises(m) for m in modules) for family in list_families()}
    best = max(counts.values(), default=0)
    found = [family_id for family_id, count in counts.items() if count and count == best]
    if len(found) != 1:
        sample = ", ".join(sorted(modules)[:3]) or "no keys"
        what = "several families alike: " + " and ".join(found) if found else "no known family"
        raise ValueError(
            f"LoRA layer names show {what} (first: {sample}); pass family= (one of {', '.join(lora_families())})"
        )
    return found[0]


def _module_name(key: str) -> str:
    match = _SUFFIX.fullmatch(key)
    module = match["module"] if match else key
    for prefix in _PREFIXES:
        module = module.removeprefix(prefix)
    return module


def lora_state_dict(
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]], format: str, family: str | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in ``format`` (see the module docstring); ``diffusers`` needs the ``family`` whose
    module names to write (None: guessed from the layer names)."""
    if format not in FORMATS:
        raise ValueError(f"LoRA format {format!r}; use one of {', '.join(FORMATS)}")
    state: dict[str, torch.Tensor] = {}
    if format in ("comfyui", "kohya"):
        for layer, (down, up, alpha) in layers.items():
            name = f"diffusion_model.{layer}" if format == "comfyui" else KOHYA_PREFIX + layer.replace(".", "_")
            state[f"{name}.lora_down.weight"] = down.contiguous()
            state[f"{name}.lora_up.weight"] = up.contiguous()
            state[f"{name}.alpha"] = torch.tensor(float(alpha))
        return state
    naming = _naming(family or guess_lora_family(layers))
    names_of, target_of = naming.to_diffusers, naming.from_diffusers
    for layer, (down, up, alpha) in layers.items():
        names = names_of(layer)
        if not names:
            raise ValueError(f"layer {layer!r} has no diffusers name; save this LoRA as comfyui or kohya")
        scaled = up.float() * (float(alpha) / down.shape[0])
        out_features, in_features = scaled.shape[0], down.shape[1]
        for name in names:
            target = target_of(name)
            rows = scaled
            if target.part is not None:
                sizes = target.part_sizes(out_features, in_features)
                start = sum(sizes[: target.part])
                rows = scaled[start : start + sizes[target.part]]
            if target.swap_halves:
                first, second = rows.chunk(2, dim=0)
                rows = torch.cat([second, first])
            state[f"transformer.{name}.lora_A.weight"] = down.to(up.dtype).clone()  # parts share no storage
            state[f"transformer.{name}.lora_B.weight"] = rows.to(up.dtype).contiguous()
    return state


def save_lora_file(
    layers: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    path: str | os.PathLike,
    *,
    format: str = "comfyui",
    family: str | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``{layer: (down, up, alpha)}`` as a ``.safetensors`` LoRA in ``format``, atomically; returns the path.

    ``metadata`` values are strings; ``base_model``, ``steps``, ``trigger_words``, ``resolution`` and ``title``
    are expanded into the ``ss_*``/``modelspec.*`` keys, any other key is stored as given. ``dtype`` casts the
    tensors (None: as given, typically float32). ``family`` None: guessed from the layer names (needed for the
    diffusers format and the family's ``ss_*`` values; a kohya/ComfyUI file of unrecognised layers is written with
    generic metadata). overwrite=False never replaces a file: a taken name (also one
    taken by a run finishing at the same moment) gives ``name-1.safetensors``, ... The mode follows the umask.
    """
    from ds_loader.files import save_safetensors_atomic

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    if not layers:
        raise ValueError("save_lora_file: no LoRA layers to write")
    given = dict(metadata or {})
    known = {
        key: given.pop(key) for key in ("base_model", "steps", "trigger_words", "resolution", "title") if key in given
    }
    if isinstance(known.get("trigger_words"), str):
        known["trigger_words"] = [w.strip() for w in known["trigger_words"].split(",")]
    if family is None:
        try:
            family = guess_lora_family(layers)
        except ValueError:
            if format == "diffusers":
                raise
    header = lora_metadata(layers, family=family, extra=given, **known)
    # A source's adapter config (kept by convert) describes the source's tensors, not these.
    header.pop(ADAPTER_METADATA_KEY, None)
    header["ds.format"] = format
    state = lora_state_dict(layers, format, family)
    if format == "diffusers":
        header["ds.alpha_folded_into_lora_B"] = "true"
        header[ADAPTER_METADATA_KEY] = _diffusers_adapter_metadata(state)
    if dtype is not None:
        state = {k: v.to(dtype) if not k.endswith(".alpha") else v for k, v in state.items()}
    return save_safetensors_atomic(state, path, header, overwrite=overwrite, clean_leftovers=True)


def _diffusers_adapter_metadata(state: Mapping[str, torch.Tensor], prefix: str = "transformer") -> str:
    """diffusers' ``lora_adapter_metadata`` (peft's LoraConfig fields, prefixed) for a diffusers-format state
    dict whose ``lora_B`` already holds ``alpha / rank``: every module's alpha is its rank (scale 1), so diffusers,
    peft and ``read_lora`` all apply exactly ``lora_B @ lora_A``. Written as diffusers' ``get_peft_kwargs``
    describes such files: the most common rank as ``r``, the others in ``rank_pattern`` and ``alpha_pattern``."""
    suffix = ".lora_A.weight"
    ranks = {
        key[len(prefix) + 1 : -len(suffix)]: int(tensor.shape[0])
        for key, tensor in state.items()
        if key.startswith(f"{prefix}.") and key.endswith(suffix)
    }
    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {module: value for module, value in sorted(ranks.items()) if value != rank}
    config = {
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": others,
        "alpha_pattern": dict(others),
        "target_modules": sorted(ranks),
        "use_dora": False,
        "use_rslora": False,
        "lora_bias": False,
    }
    return json.dumps({f"{prefix}.{field}": value for field, value in config.items()}, indent=2, sort_keys=True)


def read_lora_layers(
    path: str | os.PathLike, *, model: nn.Module | None = None, family: str | None = None
) -> LoraWeights:
    """Any LoRA file as ``{layer: (down, up, alpha)}`` on the family's own layer names.

    With ``model`` the layers are matched to it (as ``pipe.load_lora`` does; q/k/v parts are stacked along the
    rank). Without it, names come from the family's naming rules and fused layers need all their parts.
    ``family`` None: guessed from the file's layer names (``guess_lora_family``), or from ``model``'s.
    """
    return _read_layers(path, model, family)[0]


def _read_layers(path: str | os.PathLike, model: nn.Module | None, family: str | None) -> tuple[LoraWeights, str]:
    """The layers of a LoRA file and the family they were read as."""
    pieces, unknown = parse_lora(read_lora(path))
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} keys are not LoRA tensors (first: {unknown[:3]})")
    if family is None:
        try:
            family = guess_lora_family(pieces)
        except ValueError as error:
            if model is None:
                raise ValueError(f"{path}: {error}") from None
            # A LoRA on a few non-block layers: the model's own layer names tell the family instead.
            family = guess_lora_family(name for name, _ in model.named_modules())
    if model is not None:
        layers, unmatched = lora_layers(pieces, model, _naming(family).from_diffusers)
        if unmatched:
            raise ValueError(f"{path}: modules {unmatched[:3]} match no layer of {type(model).__name__}")
        return {name: (down, up, float(down.shape[0])) for name, (down, up) in layers.items()}, family
    return _layers_by_name(pieces, family, path), family


def _layers_by_name(pieces: Mapping[str, LoraPiece], family: str, path: object) -> LoraWeights:
    naming = _naming(family)
    layer_from_flat, diffusers_lora_target = naming.from_flat, naming.from_diffusers
    layers: LoraWeights = {}
    fused: dict[str, list[tuple[object, LoraPiece]]] = {}
    for module, piece in pieces.items():
        rank = piece.down.shape[0]
        alpha = float(piece.alpha) if piece.alpha is not None else float(rank)
        if module.startswith(KOHYA_PREFIX):
            layer = layer_from_flat(module[len(KOHYA_PREFIX) :])
            if layer is None:
                raise ValueError(f"{path}: {module} is not a {family} layer")
            layers[layer] = (piece.down.float(), piece.up.float(), alpha)
            continue
        target = diffusers_lora_target(module)
        if target is None:
            if layer_from_flat(module.replace(".", "_")) == module:
                layers[module] = (piece.down.float(), piece.up.float(), alpha)
                continue
            raise ValueError(f"{path}: {module} is not a {family} layer")
        if target.part is None and not target.swap_halves:
            layers[target.layer] = (piece.down.float(), piece.up.float(), alpha)
        else:
            fused.setdefault(target.layer, []).append((target, piece))
    for layer, items in fused.items():
        layers[layer] = _stack_parts(layer, items, path)
    return layers


def _stack_parts(layer: str, items: list, path: object) -> tuple[torch.Tensor, torch.Tensor, float]:
    """diffusers parts of one fused layer (all of them needed, to know its size) as one stacked-rank LoRA."""
    target0 = items[0][0]
    if target0.part is None:  # a swapped whole layer (FLUX.1 norm_out)
        piece = items[0][1]
        scale = (piece.alpha / piece.down.shape[0]) if piece.alpha is not None else 1.0
        first, second = piece.up.float().chunk(2, dim=0)
        return piece.down.float() * scale, torch.cat([second, first]), float(piece.down.shape[0])
    by_part = {target.part: piece for target, piece in items}
    rows = [by_part[p].up.shape[0] if p in by_part else None for p in range(max(by_part) + 1)]
    out_features, in_features = sum(r for r in rows if r), items[0][1].down.shape[1]
    sizes = target0.part_sizes(out_features, in_features)
    if len(by_part) != len(sizes) or [by_part[p].up.shape[0] for p in range(len(sizes))] != sizes:
        raise ValueError(
            f"{path}: layer {layer} has only parts {sorted(by_part)} of {len(sizes)}; pass model= to convert it"
        )
    downs, ups, offset = [], [], 0
    total = sum(by_part[p].down.shape[0] for p in range(len(sizes)))
    for part in range(len(sizes)):
        piece = by_part[part]
        rank = piece.down.shape[0]
        scale = (piece.alpha / rank) if piece.alpha is not None else 1.0
        downs.append(piece.down.float() * scale)
        up = torch.zeros(out_features, total)
        start = sum(sizes[:part])
        up[start : start + sizes[part], offset : offset + rank] = piece.up.float()
        ups.append(up)
        offset += rank
    down = torch.cat(downs)
    return down, sum(ups), float(down.shape[0])


def convert_lora_file(
    source: str | os.PathLike,
    target: str | os.PathLike,
    to: str = "comfyui",
    *,
    model: nn.Module | None = None,
    family: str | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Rewrite a LoRA file (any format ``pipe.load_lora`` reads) in format ``to``; the weight delta is unchanged.

    The source's metadata is kept (updated rank/alpha keys are recomputed); ``metadata`` adds or replaces keys.
    ``family`` None: guessed from the source's layer names.
    """
    from ds_vram import read_safetensors_header

    source = Path(source)
    layers, family = _read_layers(source, model, family)
    kept: dict[str, str] = {}
    if source.suffix == ".safetensors":
        kept = {k: v for k, v in read_safetensors_header(source)[1].items() if not k.startswith("ds.")}
        for key in ("ss_network_dim", "ss_network_alpha"):
            kept.pop(key, None)
    merged = {**kept, **(metadata or {})}
    return save_lora_file(layers, target, format=to, family=family, metadata=merged, overwrite=overwrite)


def merge_lora_files(
    sources: Iterable[tuple[str | os.PathLike, float]],
    target: str | os.PathLike,
    to: str = "comfyui",
    *,
    model: nn.Module | None = None,
    family: str | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """One LoRA whose delta is the weighted sum of several: ranks are concatenated, so the sum is exact.

    ``family`` None: guessed from each source's layer names; sources of different families are refused.
    """
    merged: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    families: dict[str, str] = {}
    for path, scale in sources:
        layers, families[str(path)] = _read_layers(path, model, family)
        for layer, (down, up, alpha) in layers.items():
            merged.setdefault(layer, []).append((down * (alpha / down.shape[0]) * scale, up))
    if not merged:
        raise ValueError("merge_lora_files: no sources given")
    if len(set(families.values())) > 1:
        raise ValueError(f"merge_lora_files: the sources are LoRAs of different model families: {families}")
    family = next(iter(families.values()))
    layers = {}
    for layer, parts in merged.items():
        down = torch.cat([d for d, _ in parts])
        up = torch.cat([u for _, u in parts], dim=1)
        layers[layer] = (down, up, float(down.shape[0]))
    return save_lora_file(layers, target, format=to, family=family, metadata=metadata, overwrite=overwrite)
