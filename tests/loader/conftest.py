"""A tiny test-only model family ("tiny") and real checkpoint files in each format ds-loader reads.

The DiT-like model has the key names of its "original" release; a "diffusers" format renames keys, keeps q/k/v
fused (split on load), keeps the adaLN shift and scale projections apart (fused on load), swaps the final
modulation halves and adds a leading batch dim to the position embedding; a "comfyui" format prefixes the
original keys. A second spec, a tiny VAE, shares folders with the DiT.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ds_loader import (
    Detection,
    Mismatch,
    ModelSpec,
    Recipe,
    fuse,
    register_spec,
    rename,
    reshape,
    split,
    strip_prefix,
    swap_halves,
    unregister_spec,
)


@dataclass(frozen=True)
class TinyConfig:
    dim: int = 32
    depth: int = 2
    in_channels: int = 8
    tokens: int = 4


class TinyAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x))
        return self.proj(out)


class TinyModulation(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, 2 * dim)


class TinyBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = TinyAttention(dim)
        self.mod = TinyModulation(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self.mod.lin(x.mean(1, keepdim=True)).chunk(2, dim=-1)
        x = x + self.attn(self.norm(x) * (1 + scale) + shift)
        return x + self.mlp(x)


class TinyFinal(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.adaLN = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(x.mean(1, keepdim=True)).chunk(2, dim=-1)
        return self.linear(x * (1 + scale) + shift)


class TinyDiT(nn.Module):
    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.img_in = nn.Linear(config.in_channels, config.dim)
        self.pos_embed = nn.Parameter(torch.zeros(config.tokens, config.dim))
        self.register_buffer("position_ids", torch.arange(config.tokens), persistent=True)
        self.blocks = nn.ModuleList(TinyBlock(config.dim) for _ in range(config.depth))
        self.final = TinyFinal(config.dim, config.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.img_in(x) + self.pos_embed[self.position_ids]
        for block in self.blocks:
            x = block(x)
        return self.final(x)


@dataclass(frozen=True)
class TinyVAEConfig:
    channels: int = 8


class TinyVAE(nn.Module):
    def __init__(self, config: TinyVAEConfig):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, config.channels, 3, padding=1))
        self.decoder = nn.Sequential(nn.Conv2d(config.channels, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


DIFFUSERS_RECIPE = Recipe(
    rename(r"x_embedder\.(weight|bias)", r"img_in.\1"),
    reshape(r"pos_embed\.pos_embed", "pos_embed", lambda shape: shape[1:]),
    split(
        r"transformer_blocks\.(\d+)\.attn\.to_qkv\.(weight|bias)",
        [r"blocks.\1.attn.q.\2", r"blocks.\1.attn.k.\2", r"blocks.\1.attn.v.\2"],
    ),
    rename(r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    rename(r"transformer_blocks\.(\d+)\.norm1\.(weight|bias)", r"blocks.\1.norm.\2"),
    fuse(
        r"transformer_blocks\.(?P<i>\d+)\.(?P<part>shift|scale)_proj\.(?P<p>weight|bias)",
        r"blocks.\g<i>.mod.lin.\g<p>",
        ["shift", "scale"],
    ),
    rename(r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.(weight|bias)", r"blocks.\1.mlp.0.\2"),
    rename(r"transformer_blocks\.(\d+)\.ff\.net\.2\.(weight|bias)", r"blocks.\1.mlp.2.\2"),
    swap_halves(r"norm_out\.linear\.(weight|bias)", r"final.adaLN.\1"),
    rename(r"proj_out\.(weight|bias)", r"final.linear.\1"),
)


COMFY_PREFIX = "model.diffusion_model."
COMFY_RECIPE = Recipe(strip_prefix(COMFY_PREFIX))

_LAYOUTS = (
    ("original", "img_in.weight", "pos_embed", "blocks."),
    ("comfyui", COMFY_PREFIX + "img_in.weight", COMFY_PREFIX + "pos_embed", COMFY_PREFIX + "blocks."),
    ("diffusers", "x_embedder.weight", "pos_embed.pos_embed", "transformer_blocks."),
)


def detect_tiny_dit(view) -> Detection | Mismatch:
    for fmt, embed, pos, blocks in _LAYOUTS:
        if embed in view and pos in view:
            dim, in_channels = view.shape(embed)
            tokens = view.shape(pos)[-2]
            return Detection(
                fmt, TinyConfig(dim=dim, depth=view.count_blocks(blocks), in_channels=in_channels, tokens=tokens)
            )
    keys = list(view.keys())
    closeness = sum("blocks." in k for k in keys) / max(len(keys), 1)
    return Mismatch("no img_in.weight or x_embedder.weight with a position embedding", closeness)


def detect_tiny_vae(view) -> Detection | Mismatch:
    if "encoder.0.weight" in view and "decoder.0.weight" in view:
        return Detection("original", TinyVAEConfig(channels=view.shape("encoder.0.weight")[0]))
    found = sum(k.startswith(("encoder.", "decoder.")) for k in view)
    return Mismatch("no encoder.0.weight and decoder.0.weight", found / max(len(view), 1))


DIT_SPEC = ModelSpec(
    name="tiny.dit",
    family="tiny",
    model_class=TinyDiT,
    config_class=TinyConfig,
    detect=detect_tiny_dit,
    formats={"original": None, "diffusers": DIFFUSERS_RECIPE, "comfyui": COMFY_RECIPE},
    never_fp8=("final.*", "img_in"),
    vram_units=("blocks.*.attn",),
)
VAE_SPEC = ModelSpec(
    name="tiny.vae",
    family="tiny",
    model_class=TinyVAE,
    config_class=TinyVAEConfig,
    detect=detect_tiny_vae,
    formats={"original": None},
)


def original_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain eager conversion ours -> diffusers-like, used to write the diffusers files."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"blocks\.(\d+)\.attn\.q\.(weight|bias)", key):
            i, p = m.groups()
            parts = [sd[f"blocks.{i}.attn.{n}.{p}"] for n in "qkv"]
            out[f"transformer_blocks.{i}.attn.to_qkv.{p}"] = torch.cat(parts)
        elif re.fullmatch(r"blocks\.\d+\.attn\.[kv]\.(weight|bias)", key):
            continue
        elif m := re.fullmatch(r"blocks\.(\d+)\.mod\.lin\.(weight|bias)", key):
            shift, scale = value.chunk(2)
            out[f"transformer_blocks.{m[1]}.shift_proj.{m[2]}"] = shift.clone()
            out[f"transformer_blocks.{m[1]}.scale_proj.{m[2]}"] = scale.clone()
        elif key.startswith("final.adaLN."):
            shift, scale = value.chunk(2)
            out["norm_out.linear." + key.rsplit(".", 1)[1]] = torch.cat([scale, shift])
        elif key == "pos_embed":
            out["pos_embed.pos_embed"] = value[None].clone()
        else:
            for pattern, replacement in (
                (r"img_in\.", "x_embedder."),
                (r"final\.linear\.", "proj_out."),
                (r"blocks\.(\d+)\.attn\.proj\.", r"transformer_blocks.\1.attn.to_out.0."),
                (r"blocks\.(\d+)\.norm\.", r"transformer_blocks.\1.norm1."),
                (r"blocks\.(\d+)\.mlp\.0\.", r"transformer_blocks.\1.ff.net.0.proj."),
                (r"blocks\.(\d+)\.mlp\.2\.", r"transformer_blocks.\1.ff.net.2."),
            ):
                key = re.sub("^" + pattern, replacement, key)
            out[key] = value.clone()
    return out


def diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An independent eager conversion diffusers-like -> ours, to compare the lazy recipe with."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if m := re.fullmatch(r"transformer_blocks\.(\d+)\.attn\.to_qkv\.(weight|bias)", key):
            for name, part in zip("qkv", value.chunk(3), strict=True):
                out[f"blocks.{m[1]}.attn.{name}.{m[2]}"] = part
        elif m := re.fullmatch(r"transformer_blocks\.(\d+)\.shift_proj\.(weight|bias)", key):
            scale = sd[f"transformer_blocks.{m[1]}.scale_proj.{m[2]}"]
            out[f"blocks.{m[1]}.mod.lin.{m[2]}"] = torch.cat([value, scale])
        elif "scale_proj" in key:
            continue
        elif key.startswith("norm_out.linear."):
            scale, shift = value.chunk(2)
            out["final.adaLN." + key.rsplit(".", 1)[1]] = torch.cat([shift, scale])
        elif key == "pos_embed.pos_embed":
            out["pos_embed"] = value[0]
        else:
            for pattern, replacement in (
                (r"x_embedder\.", "img_in."),
                (r"proj_out\.", "final.linear."),
                (r"transformer_blocks\.(\d+)\.attn\.to_out\.0\.", r"blocks.\1.attn.proj."),
                (r"transformer_blocks\.(\d+)\.norm1\.", r"blocks.\1.norm."),
                (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj\.", r"blocks.\1.mlp.0."),
                (r"transformer_blocks\.(\d+)\.ff\.net\.2\.", r"blocks.\1.mlp.2."),
            ):
                key = re.sub("^" + pattern, replacement, key)
            out[key] = value
    return out


def random_state(module: nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if value.is_floating_point():
            state[key] = torch.randn(value.shape, generator=generator).to(dtype)
        else:
            state[key] = value.clone()
    return state


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """The tiny family: classes, specs, recipes and eager converters."""
    return SimpleNamespace(
        TinyConfig=TinyConfig,
        TinyDiT=TinyDiT,
        TinyVAE=TinyVAE,
        TinyVAEConfig=TinyVAEConfig,
        dit_spec=DIT_SPEC,
        vae_spec=VAE_SPEC,
        diffusers_recipe=DIFFUSERS_RECIPE,
        comfy_prefix=COMFY_PREFIX,
        to_diffusers=original_to_diffusers,
        from_diffusers=diffusers_to_original,
        random_state=random_state,
    )


@pytest.fixture()
def registered():
    """The tiny specs in the default registry for one test."""
    register_spec(DIT_SPEC, replace=True)
    register_spec(VAE_SPEC, replace=True)
    yield (DIT_SPEC, VAE_SPEC)
    unregister_spec(DIT_SPEC.name)
    unregister_spec(VAE_SPEC.name)


def _write_shards(state: dict[str, torch.Tensor], folder: Path, stem: str, count: int) -> Path:
    keys = list(state)
    weight_map = {}
    for index in range(count):
        name = f"{stem}-{index + 1:05d}-of-{count:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[index::count]}
        save_file(part, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    index_path = folder / f"{stem}.safetensors.index.json"
    index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index_path


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> SimpleNamespace:
    """Real checkpoint files of one tiny DiT (fp32) and one tiny VAE, in every layout."""
    root = tmp_path_factory.mktemp("tiny_files")
    config = TinyConfig()
    with torch.device("meta"):
        dit = TinyDiT(config)
    state = random_state(TinyDiT(config), seed=0)
    vae_state = random_state(TinyVAE(TinyVAEConfig()), seed=1)
    diffusers_state = original_to_diffusers(state)
    del dit

    ns = SimpleNamespace(root=root, config=config, state=state, vae_state=vae_state, diffusers_state=diffusers_state)
    ns.original = root / "tiny-dit.safetensors"
    save_file(state, ns.original)
    ns.original_bf16 = root / "tiny-dit-bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}, ns.original_bf16)
    ns.comfy = root / "tiny-dit-comfy.safetensors"
    save_file({COMFY_PREFIX + k: v for k, v in state.items()}, ns.comfy)
    ns.diffusers_file = root / "tiny-dit-diffusers.safetensors"
    save_file(diffusers_state, ns.diffusers_file)
    ns.vae = root / "tiny-vae.safetensors"
    save_file(vae_state, ns.vae)

    ns.sharded = root / "sharded"
    ns.sharded.mkdir()
    ns.shard_index = _write_shards(state, ns.sharded, "model", 3)

    # A diffusers repository: model_index.json, transformer/ (sharded, with a fp16 variant beside it), vae/.
    ns.repo = root / "repo"
    (ns.repo / "transformer").mkdir(parents=True)
    (ns.repo / "vae").mkdir()
    (ns.repo / "scheduler").mkdir()
    (ns.repo / "model_index.json").write_text(json.dumps({"_class_name": "TinyPipeline"}))
    (ns.repo / "scheduler" / "scheduler_config.json").write_text("{}")
    _write_shards(diffusers_state, ns.repo / "transformer", "diffusion_pytorch_model", 2)
    save_file(
        {k: v.half() for k, v in diffusers_state.items()},
        ns.repo / "transformer" / "diffusion_pytorch_model.fp16.safetensors",
    )
    (ns.repo / "transformer" / "config.json").write_text(json.dumps({"num_layers": config.depth}))
    save_file(vae_state, ns.repo / "vae" / "diffusion_pytorch_model.safetensors")

    ns.pth = root / "tiny-dit.pth"
    torch.save(state, ns.pth)
    ns.ckpt = root / "tiny-dit.ckpt"
    torch.save({"state_dict": state, "global_step": 7, "epoch": 1}, ns.ckpt)
    ns.legacy_bin = root / "tiny-dit-legacy.bin"
    torch.save(state, ns.legacy_bin, _use_new_zipfile_serialization=False)
    return ns
