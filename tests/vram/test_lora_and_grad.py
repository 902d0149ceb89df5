"""LoRA hot-loading equals fusing; gradients flow through managed layers as through plain ones."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from ds_vram import SafetensorsSource, VRAMConfig, enable_vram_management
from tests.vram.tiny_models import clone_of, tiny_inputs


def adapters(module, rank: int = 4, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    pairs = {}
    for name in ("blocks.0.up", "blocks.2.down", "head", "stem.conv", "stem.conv1d"):
        weight = module.get_submodule(name).weight
        down = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.3
        up = torch.randn(weight.shape[0], rank, *([1] * (weight.dim() - 2)), generator=generator) * 0.3
        pairs[name] = (down, up)
    return pairs


def fused(module, pairs, scale: float):
    copy = clone_of(module)
    with torch.no_grad():
        for name, (down, up) in pairs.items():
            weight = copy.get_submodule(name).weight
            weight += scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return copy


CONFIGS = {
    "cpu": dict(storage="cpu"),
    "disk-streamed": dict(storage="disk", vram_limit=0),
    "device": dict(storage="device"),
}


@pytest.mark.parametrize("place", CONFIGS)
def test_hot_loaded_lora_equals_fused(tiny_net, tiny_file, place):
    managed = clone_of(tiny_net)
    config = VRAMConfig(computation_device="cpu", computation_dtype=torch.float32, **CONFIGS[place])
    handle = enable_vram_management(managed, config, weights=SafetensorsSource(tiny_file))
    first, second = adapters(tiny_net, seed=1), adapters(tiny_net, rank=2, seed=2)
    handle.add_lora("style", first, scale=0.8)
    torch.testing.assert_close(managed(*tiny_inputs()), fused(tiny_net, first, 0.8)(*tiny_inputs()))
    handle.add_lora("detail", second, scale=0.5)
    both = fused(fused(tiny_net, first, 0.8), second, 0.5)
    torch.testing.assert_close(managed(*tiny_inputs()), both(*tiny_inputs()))
    handle.set_lora_scale("style", -1.0)
    torch.testing.assert_close(
        managed(*tiny_inputs()), fused(fused(tiny_net, first, -1.0), second, 0.5)(*tiny_inputs())
    )
    assert handle.lora_names == ["detail", "style"]
    handle.remove_lora("style")
    handle.remove_lora("detail")
    assert torch.equal(managed(*tiny_inputs()), tiny_net(*tiny_inputs()))  # detaching is exact


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_lora_on_fp8_storage_adds_the_exact_delta(tiny_net, tiny_file, storage):
    """On FP8 weights the adapter is not quantized: the output moves by exactly the LoRA's contribution."""
    managed = clone_of(tiny_net)
    config = VRAMConfig(
        storage=storage, storage_dtype="fp8", computation_device="cpu", computation_dtype=torch.float32, vram_limit=1.0
    )
    handle = enable_vram_management(managed, config, weights=SafetensorsSource(tiny_file))
    down, up = adapters(tiny_net)["head"]
    seen = []
    managed.head.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    base = managed(*tiny_inputs())
    handle.add_lora("style", {"head": (down, up)}, scale=0.7)
    with_lora = managed(*tiny_inputs())
    torch.testing.assert_close(seen[0], seen[1])
    expected_delta = torch.nn.functional.linear(seen[0], 0.7 * up @ down)
    torch.testing.assert_close(with_lora - base, expected_delta, rtol=1e-4, atol=1e-5)
    assert with_lora.sub(base).abs().max() > 0.1


def test_lora_errors_name_the_layer(tiny_net):
    handle = enable_vram_management(
        clone_of(tiny_net), VRAMConfig(computation_device="cpu", computation_dtype=torch.float32)
    )
    good = adapters(tiny_net)
    with pytest.raises(KeyError, match=r"no managed Linear or Conv layer named 'blocks.9.up'"):
        handle.add_lora("x", {"blocks.9.up": good["head"]})
    with pytest.raises(ValueError, match=r"LoRA on 'head': weight \(16, 32\) needs down \(4, 32\)"):
        handle.add_lora("x", {"head": good["blocks.0.up"]})
    with pytest.raises(TypeError, match=r"LoRA on 'final_norm'.*not rms_norm"):
        handle.add_lora("x", {"final_norm": good["head"]})
    assert handle.lora_names == []  # a failed add attaches nothing
    handle.add_lora("x", {"head": good["head"]})
    with pytest.raises(ValueError, match="already attached"):
        handle.add_lora("x", {"head": good["head"]})
    with pytest.raises(KeyError, match="no LoRA named 'y'"):
        handle.set_lora_scale("y", 1.0)


@pytest.mark.parametrize("storage", ["cpu", "disk", "device"])
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_gradients_reach_inputs_and_adapters(tiny_net, tiny_file, storage, use_checkpoint):
    pairs = {name: (down.requires_grad_(), up.requires_grad_()) for name, (down, up) in adapters(tiny_net).items()}
    reference = fused(tiny_net, {}, 0.0)
    reference.requires_grad_(False)

    def reference_forward(indices, image):
        # Plain autograd on the same math: base layers plus adapters applied by hand.
        hooks = []
        for name, (down, up) in pairs.items():
            layer = reference.get_submodule(name)

            def add(module, args, output, down=down, up=up):
                flat = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
                return (
                    output + module._conv_forward(args[0], flat, None)
                    if hasattr(module, "_conv_forward")
                    else output + torch.nn.functional.linear(args[0], flat)
                )

            hooks.append(layer.register_forward_hook(add))
        try:
            return reference(indices, image)
        finally:
            for hook in hooks:
                hook.remove()

    managed = clone_of(tiny_net)
    config = VRAMConfig(
        storage=storage,
        computation_device="cpu",
        computation_dtype=torch.float32,
        vram_limit=None if storage == "device" else 0.0,
    )
    handle = enable_vram_management(managed, config, weights=SafetensorsSource(tiny_file))
    handle.add_lora("train", pairs)

    indices, image = tiny_inputs()
    results = []
    for forward in (reference_forward, managed):
        image_input = image.clone().requires_grad_()
        for down, up in pairs.values():
            down.grad = up.grad = None
        output = (
            checkpoint(forward, indices, image_input, use_reentrant=False)
            if use_checkpoint
            else forward(indices, image_input)
        )
        output.square().mean().backward()
        results.append((output.detach(), image_input.grad, [t.grad.clone() for pair in pairs.values() for t in pair]))
    (ref_out, ref_grad, ref_adapter_grads), (out, grad, adapter_grads) = results
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad, ref_grad)
    for actual, expected in zip(adapter_grads, ref_adapter_grads, strict=True):
        torch.testing.assert_close(actual, expected)
    assert all(not p.requires_grad for p in managed.parameters())  # managed weights are frozen


def test_streamed_linear_weights_are_not_kept_for_backward(tiny_net):
    """Training through streamed layers must not pin every fetched weight until backward."""
    managed = clone_of(tiny_net)
    handle = enable_vram_management(
        managed,
        VRAMConfig(
            storage="cpu", storage_dtype="fp8", computation_device="cpu", computation_dtype=torch.float32, vram_limit=0
        ),
    )
    handle.add_lora("train", {"head": tuple(t.requires_grad_() for t in adapters(tiny_net)["head"])})
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    indices, image = tiny_inputs()
    image.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = managed(indices, image)
    linear_weights = {tuple(m.weight.shape) for m in managed.modules() if isinstance(m, torch.nn.Linear)}
    assert not linear_weights & set(saved_shapes), saved_shapes
    output.square().mean().backward()
    reference = clone_of(tiny_net)
    resident = enable_vram_management(
        reference,
        VRAMConfig(storage="cpu", storage_dtype="fp8", computation_device="cpu", computation_dtype=torch.float32),
    )
    resident.add_lora("train", {"head": adapters(tiny_net)["head"]})  # resident layers: plain autograd
    reference_image = image.detach().clone().requires_grad_()
    reference(indices, reference_image).square().mean().backward()
    torch.testing.assert_close(image.grad, reference_image.grad)
