"""LoRA adapters through peft on a model's own layers, and their weights as ``{layer: (down, up, alpha)}``."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = ["add_lora", "load_lora_state", "lora_state", "resolve_targets"]

ADAPTER = "default"


def resolve_targets(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Linear layers whose names match a glob pattern (``"double_blocks.*.img_attn.qkv"``) or end with a plain one.

    Raises naming the patterns that matched nothing, so a typo does not silently train fewer layers.
    """
    patterns = list(patterns)
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen: list[str] = []
    unmatched = []
    for pattern in patterns:
        hits = [
            name
            for name in linears
            if fnmatch.fnmatchcase(name, pattern)
            or (not any(c in pattern for c in "*?[") and name.endswith("." + pattern))
            or name == pattern
        ]
        if not hits:
            unmatched.append(pattern)
        chosen.extend(hit for hit in hits if hit not in chosen)
    if unmatched:
        sample = ", ".join(linears[:6])
        raise ValueError(
            f"LoRA target pattern(s) {unmatched} match no Linear layer of {type(model).__name__} "
            f"(layers look like: {sample}, ...)"
        )
    return chosen


def add_lora(
    model: nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    device: torch.device | str | None = None,
) -> list[str]:
    """Inject peft LoRA layers (adapter ``"default"``) in place; only they are trainable afterwards.

    Exact layer names are passed to peft, so what is trained is exactly ``targets``. The adapters are float32
    on ``device`` (default: the device of each wrapped layer's weight), whatever the frozen weights' dtype or
    placement: ds-vram may keep those in CPU RAM, in FP8, or on the meta device as placeholders.
    """
    from peft import LoraConfig, inject_adapter_in_model

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    devices = {
        name: torch.device(device) if device is not None else _layer_device(model.get_submodule(name))
        for name in targets
    }
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name in targets:
        layer = model.get_submodule(name)
        reinit = False
        for holder in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            if holder.weight.device.type == "meta":
                holder.to_empty(device=devices[name])
                reinit = True
            holder.to(device=devices[name], dtype=torch.float32)
            holder.weight.requires_grad_(True)
        if reinit:
            layer.reset_lora_parameters(ADAPTER, True)
    return targets


def _layer_device(layer: nn.Module) -> torch.device:
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return torch.device("cpu")


def lora_state(model: nn.Module, alpha: float) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{layer name: (down (r, in), up (out, r), alpha)}`` of every peft LoRA layer, detached float32 on CPU."""
    result = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a:
            down = lora_a[ADAPTER].weight.detach().float().cpu().contiguous()
            up = module.lora_B[ADAPTER].weight.detach().float().cpu().contiguous()
            result[_clean(name)] = (down, up, float(alpha))
    return result


def load_lora_state(model: nn.Module, layers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy ``{layer: (down, up)}`` into the peft adapters (rank must match; alpha/rank already folded)."""
    modules = {_clean(name): module for name, module in model.named_modules() if hasattr(module, "lora_A")}
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"LoRA layers {missing[:5]} are not trained in this run (targets differ)")
    with torch.no_grad():
        for name, (down, up) in layers.items():
            module = modules[name]
            a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
            if a.shape != down.shape or b.shape != up.shape:
                raise ValueError(
                    f"LoRA layer {name}: file has rank {down.shape[0]}, this run trains rank {a.shape[0]}"
                )
            scaling = module.scaling[ADAPTER]
            a.copy_(down.to(a.dtype))
            b.copy_((up / scaling).to(b.dtype))


def _clean(name: str) -> str:
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name
