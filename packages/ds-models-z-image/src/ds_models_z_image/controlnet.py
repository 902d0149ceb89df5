"""Z-Image-Turbo-Fun-Controlnet-Union (alibaba-pai / PAI, 1.0, 2.0 and 2.1), with the released parameter names.

The released ``.safetensors`` hold only the control weights, under the names of diffusers' ``ZImageControlNetModel``
(which are VideoX-Fun's): ``control_all_x_embedder.2-1``, ``control_layers.N.*`` (a Z-Image block plus
``before_proj`` on block 0 and ``after_proj`` on every block) and ``control_noise_refiner.N.*``. The embedders,
refiners, pad tokens and RoPE are the DiT's own, so the ControlNet runs with the DiT it is attached to
(``controlnet(dit, ...)``), as VideoX-Fun's control transformer does.

How the control stream runs (VACE-style, as VideoX-Fun's ``ZImageControlTransformer2DModel``):

- the control latents (``control_in_dim`` channels: 16 control latents for 1.0; for 2.x also the 1-channel
  inpaint mask and the 16 masked-image latents) are cut into 2x2 patches, embedded and padded with the DiT's
  ``x_pad_token``;
- each control block takes ``c`` (block 0: ``before_proj(c) + x``), runs as a modulated Z-Image block over the
  same positions, and emits ``after_proj(c)`` as a residual ("hint");
- ``refiner`` says what happens at the noise-refiner stage: ``"control_noise_refiner"`` (2.1) runs the
  ``control_noise_refiner`` blocks over the image tokens and adds their hints after the DiT's noise-refiner
  blocks; ``"control_layers"`` (2.0) does the same with the ``control_layers`` themselves (2.0's typo, fixed in
  2.1); ``"none"`` (1.0) runs the plain ``control_noise_refiner`` blocks over the control tokens alone;
- the control layers then run over ``[control, caption]`` beside the unified ``[image, caption]`` sequence and
  their hints are added after the main layers ``control_layers_places``.

``forward`` returns both kinds of hint (``ZImageControlHints``): ``layers`` for the DiT's ``controlnet_hints``
and ``refiner`` for its noise refiner. diffusers 0.42's ``ZImageControlNetPipeline`` drops the refiner hints in
the transformer (its ControlNet applies them only to its own copy of the image tokens); the official VideoX-Fun
model and DiffSynth-Studio add them to the DiT's noise refiner, and so do we.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ds_loader import Detection, HeaderView, Mismatch, ModelSpec, Recipe, drop
from ds_models_core import patchify
from ds_models_z_image.dit import (
    ZImageBlock,
    ZImageDiT,
    ZImageDiTConfig,
    caption_groups,
    padded_length,
    rope_frequencies,
    sequence_positions,
)

__all__ = [
    "CONTROLNET_SPEC",
    "REFINER_MODES",
    "ZImageControlBlock",
    "ZImageControlHints",
    "ZImageControlNet",
    "ZImageControlNetConfig",
    "detect_controlnet",
]

REFINER_MODES = ("control_noise_refiner", "control_layers", "none")


@dataclass(frozen=True)
class ZImageControlNetConfig:
    """Sizes of a Z-Image Fun ControlNet; names follow diffusers' ``ZImageControlNetModel`` arguments.

    control_in_dim: input channels of the control latents (1.0: 16; 2.x: 33 = 16 control + 1 mask + 16 masked image).
    n_control_layers: ``control_layers`` blocks (2.x: 15, 2.1-lite: 3, 1.0: 6).
    n_refiner_layers: ``control_noise_refiner`` blocks (2, as the DiT's noise refiner; 0 for 2.0, which has none
        in use).
    refiner: ``"control_noise_refiner"`` (2.1), ``"control_layers"`` (2.0) or ``"none"`` (1.0); see the module.
    control_layers_places: the main DiT layers that receive the hints, one per control layer; None spreads them
        evenly over the DiT's layers (``range(0, n_layers, n_layers // n_control_layers)``), which is what every
        release does (15 -> every 2nd of 30, 6 -> every 5th, 3 -> every 10th) and what the weights cannot tell.
    control_refiner_layers_places: the noise-refiner blocks that receive refiner hints (releases: 0 and 1).
    """

    dim: int = 3840
    n_heads: int = 30
    norm_eps: float = 1e-5
    patch_size: int = 2
    f_patch_size: int = 1
    control_in_dim: int = 33
    n_control_layers: int = 15
    n_refiner_layers: int = 2
    refiner: str = "control_noise_refiner"
    control_layers_places: tuple[int, ...] | None = None
    control_refiner_layers_places: tuple[int, ...] = (0, 1)

    PRESETS: ClassVar[tuple[str, ...]] = ("union-2.1", "union-2.1-lite", "union-2.0", "union-1.0", "tiny")

    def __post_init__(self) -> None:
        if self.control_layers_places is not None:
            object.__setattr__(self, "control_layers_places", tuple(self.control_layers_places))
        object.__setattr__(self, "control_refiner_layers_places", tuple(self.control_refiner_layers_places))
        for name in ("dim", "n_heads", "patch_size", "f_patch_size", "control_in_dim", "n_control_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ZImageControlNetConfig.{name}={value!r} must be a positive integer")
        if (
            isinstance(self.n_refiner_layers, bool)
            or not isinstance(self.n_refiner_layers, int)
            or (self.n_refiner_layers < 0)
        ):
            raise ValueError(f"ZImageControlNetConfig.n_refiner_layers={self.n_refiner_layers!r} must be >= 0")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"ZImageControlNetConfig.dim={self.dim} must be n_heads={self.n_heads} times an even head width"
            )
        if self.refiner not in REFINER_MODES:
            raise ValueError(f"ZImageControlNetConfig.refiner={self.refiner!r} must be one of {REFINER_MODES}")
        if self.refiner == "control_noise_refiner" and not self.n_refiner_layers:
            raise ValueError("ZImageControlNetConfig: refiner='control_noise_refiner' needs n_refiner_layers > 0")
        hints = self.n_control_layers if self.refiner == "control_layers" else self.n_refiner_layers
        if self.refiner != "none" and len(self.control_refiner_layers_places) > hints:
            raise ValueError(
                f"ZImageControlNetConfig.control_refiner_layers_places={self.control_refiner_layers_places} names "
                f"more refiner blocks than the {hints} hints the {self.refiner!r} stage gives"
            )
        places = self.control_layers_places
        if places is not None and (
            len(places) != self.n_control_layers or places[0] != 0 or list(places) != sorted(set(places))
        ):
            raise ValueError(
                f"ZImageControlNetConfig.control_layers_places={places} must be {self.n_control_layers} increasing "
                "layer indices starting at 0 (one per control layer), or None"
            )

    @property
    def patch_key(self) -> str:
        return f"{self.patch_size}-{self.f_patch_size}"

    @property
    def block_config(self) -> ZImageDiTConfig:
        """The DiT config the control blocks are built from (only width, heads and eps matter to a block)."""
        head_dim = self.dim // self.n_heads
        side = head_dim * 3 // 8 // 2 * 2
        return ZImageDiTConfig(
            dim=self.dim,
            n_heads=self.n_heads,
            norm_eps=self.norm_eps,
            n_layers=0,
            n_refiner_layers=0,
            axes_dims=(head_dim - 2 * side, side, side),
        )

    def layer_places(self, n_layers: int) -> tuple[int, ...]:
        """The DiT layers receiving hints, for a DiT of ``n_layers`` main layers."""
        if self.control_layers_places is not None:
            places = self.control_layers_places
        else:
            stride = n_layers // self.n_control_layers
            if stride < 1 or n_layers % self.n_control_layers:
                raise ValueError(
                    f"ZImageControlNet: {self.n_control_layers} control layers cannot be spread evenly over a DiT of "
                    f"{n_layers} layers; give ZImageControlNetConfig.control_layers_places"
                )
            places = tuple(range(0, n_layers, stride))
        if places[-1] >= n_layers:
            raise ValueError(f"ZImageControlNet: hint places {places} do not fit a DiT of {n_layers} layers")
        return places

    # ------------------------------------------------------------------ releases
    @classmethod
    def union_2_1(cls) -> ZImageControlNetConfig:
        """Z-Image-Turbo-Fun-Controlnet-Union-2.1 (and its 8-step, 2601 and 2602 files, and the Tile model):
        15 control layers on every second main layer, 2 control refiner blocks, 33 input channels."""
        return cls(control_layers_places=tuple(range(0, 30, 2)))

    @classmethod
    def union_2_1_lite(cls) -> ZImageControlNetConfig:
        """The 2.1 "lite" files: 3 control layers (main layers 0, 10, 20) and 2 control refiner blocks."""
        return cls(n_control_layers=3, control_layers_places=(0, 10, 20))

    @classmethod
    def union_2_0(cls) -> ZImageControlNetConfig:
        """Z-Image-Turbo-Fun-Controlnet-Union-2.0: the control layers also run at the refiner stage (its released
        ``control_noise_refiner`` weights are unused and dropped on load)."""
        return cls(refiner="control_layers", n_refiner_layers=0, control_layers_places=tuple(range(0, 30, 2)))

    @classmethod
    def union_1_0(cls) -> ZImageControlNetConfig:
        """Z-Image-Turbo-Fun-Controlnet-Union (1.0): 6 control layers every fifth main layer, 16 input channels."""
        return cls(control_in_dim=16, n_control_layers=6, refiner="none", control_layers_places=(0, 5, 10, 15, 20, 25))

    @classmethod
    def tiny(cls) -> ZImageControlNetConfig:
        """The 2.1 architecture at test size, for ``ZImageDiTConfig.tiny()`` (width 64, 2 heads, 2 layers)."""
        return cls(dim=64, n_heads=2, n_control_layers=2)

    @classmethod
    def preset(cls, name: str) -> ZImageControlNetConfig:
        key = name.strip().lower().replace("_", "-")
        builders = {
            "union-2.1": cls.union_2_1,
            "union-2.1-lite": cls.union_2_1_lite,
            "union-2.0": cls.union_2_0,
            "union-1.0": cls.union_1_0,
            "tiny": cls.tiny,
        }
        if key not in builders:
            raise ValueError(f"unknown Z-Image ControlNet preset {name!r}; choose one of {', '.join(cls.PRESETS)}")
        return builders[key]()


@dataclass
class ZImageControlHints:
    """What the ControlNet adds to the DiT: ``layers`` (main layer -> ``(B, S, dim)`` residual after it, the DiT's
    ``controlnet_hints``) and ``refiner`` (noise-refiner block -> ``(B, image_tokens, dim)`` residual after it)."""

    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    refiner: dict[int, torch.Tensor] = field(default_factory=dict)

    def __add__(self, other: ZImageControlHints) -> ZImageControlHints:
        """The sum of two ControlNets' (or two inputs') hints."""
        return ZImageControlHints(_add(self.layers, other.layers), _add(self.refiner, other.refiner))

    def scaled(self, scale: float) -> ZImageControlHints:
        return ZImageControlHints(
            {k: v * scale for k, v in self.layers.items()}, {k: v * scale for k, v in self.refiner.items()}
        )


def _add(a: Mapping[int, torch.Tensor], b: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
            continue
        length = max(out[key].shape[1], value.shape[1])
        out[key] = F.pad(out[key], (0, 0, 0, length - out[key].shape[1])) + F.pad(
            value, (0, 0, 0, length - value.shape[1])
        )
    return out


class ZImageControlBlock(ZImageBlock):
    """A modulated Z-Image block with the control projections: ``before_proj`` (first block only) mixes the
    control tokens into the main stream's, ``after_proj`` turns the block's output into a hint."""

    def __init__(self, config: ZImageDiTConfig, first: bool) -> None:
        super().__init__(config, modulation=True)
        self.before_proj = nn.Linear(config.dim, config.dim) if first else None
        self.after_proj = nn.Linear(config.dim, config.dim)

    def forward(  # type: ignore[override]
        self, c: torch.Tensor, x: torch.Tensor, freqs: torch.Tensor, adaln: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``c``: control tokens, ``x``: the main stream's tokens at the same positions. Returns the new control
        tokens and this block's hint."""
        if self.before_proj is not None:
            c = self.before_proj(c) + x
        c = super().forward(c, freqs, adaln)
        return c, self.after_proj(c)


def _run_control(
    blocks: Sequence[ZImageControlBlock], c: torch.Tensor, x: torch.Tensor, freqs: torch.Tensor, adaln: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    hints = []
    for block in blocks:
        c, hint = block(c, x, freqs, adaln)
        hints.append(hint)
    return c, hints


class ZImageControlNet(nn.Module):
    """The Z-Image Fun ControlNet Union; call it with the DiT it controls (``controlnet(dit, ...)``).

    Build a released size without memory with ``with torch.device("meta"): ZImageControlNet(config)``; the released
    file loads with ``load_state_dict`` and no conversion (2.0's unused ``control_noise_refiner`` aside).
    """

    ds_vram_never_fp8: ClassVar[tuple[str, ...]] = ("control_all_x_embedder.*",)

    def __init__(self, config: ZImageControlNetConfig) -> None:
        super().__init__()
        self.config = config
        block = config.block_config
        patch_dim = config.f_patch_size * config.patch_size**2 * config.control_in_dim
        self.control_all_x_embedder = nn.ModuleDict({config.patch_key: nn.Linear(patch_dim, config.dim)})
        self.control_layers = nn.ModuleList(ZImageControlBlock(block, i == 0) for i in range(config.n_control_layers))
        if config.refiner == "none":
            refiner = [ZImageBlock(block, modulation=True) for _ in range(config.n_refiner_layers)]
        else:
            refiner = [ZImageControlBlock(block, i == 0) for i in range(config.n_refiner_layers)]
        self.control_noise_refiner = nn.ModuleList(refiner)

    def forward(
        self,
        dit: ZImageDiT,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        control: torch.Tensor,
        scale: float = 1.0,
    ) -> ZImageControlHints:
        """The hints for one DiT call with the same ``latents``, ``timestep``, ``text`` and ``text_mask``.

        control: ``(B, control_in_dim, H, W)`` control latents at the size of ``latents``. scale: multiplies every
        hint (VideoX-Fun's ``control_context_scale``, diffusers' ``conditioning_scale``).
        """
        self._check(dit, latents, control)
        b, length = latents.shape[0], text.shape[1]
        places = self.config.layer_places(len(dit.layers))
        groups = caption_groups(text_mask, b, length)
        results = []
        for indices, caption_len in groups:
            caption, pad = _caption(text, text_mask, indices, caption_len)
            index = torch.tensor(indices, device=latents.device)
            group = self._forward_group(dit, latents[index], timestep[index], caption, pad, control[index], scale)
            results.append((index, group))
        if len(results) == 1:
            layers, refiner = results[0][1]
        else:  # samples of different caption lengths: zero-padded to the longest, as the DiT takes them
            longest = max(hint.shape[1] for _, (hints, _) in results for hint in hints)
            first_layers, first_refiner = results[0][1]
            layers = [first_layers[0].new_zeros(b, longest, self.config.dim) for _ in first_layers]
            refiner = [hint.new_zeros(b, *hint.shape[1:]) for hint in first_refiner]
            for index, (group_layers, group_refiner) in results:
                for full, part in zip(layers, group_layers, strict=True):
                    full[index, : part.shape[1]] = part
                for full, part in zip(refiner, group_refiner, strict=True):
                    full[index] = part
        refiner_places = self.config.control_refiner_layers_places if self.config.refiner != "none" else ()
        return ZImageControlHints(
            {place: hint * scale for place, hint in zip(places, layers, strict=True)},
            dict(zip(refiner_places, refiner, strict=True)),
        )

    def embed_control(self, dit: ZImageDiT, control: torch.Tensor) -> torch.Tensor:
        """``(B, control_in_dim, H, W)`` -> ``(B, padded_length(H/2 * W/2), dim)``, padding = the DiT's
        ``x_pad_token``."""
        p = self.config.patch_size
        tokens = self.control_all_x_embedder[self.config.patch_key](patchify(control, (p, p), channels_last=True))
        extra = padded_length(tokens.shape[1]) - tokens.shape[1]
        if not extra:
            return tokens
        pad = dit.x_pad_token.to(tokens).expand(tokens.shape[0], extra, -1)
        return torch.cat([tokens, pad], dim=1)

    def _forward_group(
        self,
        dit: ZImageDiT,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        caption: torch.Tensor,
        caption_pad: torch.Tensor,
        control: torch.Tensor,
        scale: float,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Samples with one padded caption length: the main-layer hints (in control-layer order, unscaled) and the
        refiner hints (in refiner-place order, scaled: they change the image tokens the control layers then see, so
        the scale acts before them, as in VideoX-Fun)."""
        p, mode = dit.config.patch_size, self.config.refiner
        grid = (latents.shape[-2] // p, latents.shape[-1] // p)
        adaln = dit.time_embedding(timestep, latents.dtype)
        freqs = rope_frequencies(sequence_positions(caption.shape[1], grid, latents.device), dit.config)
        x = dit.embed_image(latents)
        x_freqs, cap_freqs = freqs[: x.shape[1]], freqs[x.shape[1] :]
        c = self.embed_control(dit, control.to(x.dtype))

        refiner_hints: list[torch.Tensor] = []
        if mode == "none":
            for block in dit.noise_refiner:
                x = block(x, x_freqs, adaln)
            for block in self.control_noise_refiner:
                c = block(c, x_freqs, adaln)
        else:
            blocks = self.control_noise_refiner if mode == "control_noise_refiner" else self.control_layers
            c, refiner_hints = _run_control(blocks, c, x, x_freqs, adaln)
            refiner_hints = [hint * scale for hint in refiner_hints[: len(self.config.control_refiner_layers_places)]]
            hints = dict(zip(self.config.control_refiner_layers_places, refiner_hints, strict=True))
            for i, block in enumerate(dit.noise_refiner):
                x = block(x, x_freqs, adaln)
                if i in hints:
                    x = x + hints[i]
        cap = dit.embed_caption(caption, caption_pad)
        for block in dit.context_refiner:
            cap = block(cap, cap_freqs)

        unified = torch.cat([x, cap], dim=1)
        _, layer_hints = _run_control(self.control_layers, torch.cat([c, cap], dim=1), unified, freqs, adaln)
        return layer_hints, refiner_hints

    def _check(self, dit: ZImageDiT, latents: torch.Tensor, control: torch.Tensor) -> None:
        c, d = self.config, dit.config
        if (c.dim, c.n_heads, c.patch_key) != (d.dim, d.n_heads, d.patch_key):
            raise ValueError(
                f"ZImageControlNet (width {c.dim}, {c.n_heads} heads, patch {c.patch_key}) does not fit this DiT "
                f"(width {d.dim}, {d.n_heads} heads, patch {d.patch_key})"
            )
        expected = (latents.shape[0], c.control_in_dim, *latents.shape[-2:])
        if tuple(control.shape) != expected:
            raise ValueError(
                f"ZImageControlNet: control latents have shape {tuple(control.shape)}, expected {expected} "
                f"(control_in_dim {c.control_in_dim} at the latents' size)"
            )


def _caption(
    text: torch.Tensor, text_mask: torch.Tensor | None, indices: list[int], caption_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid tokens of samples ``indices``, zero-filled to ``caption_len``, and the padding mask (as the DiT
    lays captions out)."""
    if text_mask is None:
        caption = F.pad(text[indices], (0, 0, 0, caption_len - text.shape[1]))
        pad = (torch.arange(caption_len, device=text.device) >= text.shape[1]).expand(len(indices), -1)
        return caption, pad
    caption = text.new_zeros((len(indices), caption_len, text.shape[-1]))
    pad = torch.ones(len(indices), caption_len, dtype=torch.bool, device=text.device)
    for row, index in enumerate(indices):
        valid = text[index][text_mask[index]]
        caption[row, : valid.shape[0]] = valid
        pad[row, : valid.shape[0]] = False
    return caption, pad


# ---------------------------------------------------------------------------------------------- detection
_EMBEDDER = re.compile(r"control_all_x_embedder\.(\d+)-(\d+)\.weight")
_VERSION_2_0 = re.compile(r"(?<![\d.])2\.0(?![\d])")  # "...-Union-2.0.safetensors", not "2.0.1" or "12.0"


def detect_controlnet(view: HeaderView) -> Detection | Mismatch:
    """The Fun ControlNet Union files (1.0, 2.0, 2.1 and its lite, 8-step and Tile files, and diffusers'
    ``ZImageControlNetModel`` folders): keys ``control_all_x_embedder.2-1.*``, ``control_layers.N.*`` and
    ``control_noise_refiner.N.*``.

    The refiner stage comes from the keys: plain ``control_noise_refiner`` blocks are 1.0, none at all is 2.0 as
    diffusers saves it, projected ones are 2.1. The released 2.0 file has 2.1's keys (its refiner blocks are
    zero-initialised and unused), which headers cannot tell apart; it is recognised by its name (``2.0``) or a
    diffusers ``config.json``, and its ``control_noise_refiner`` is dropped on load.
    """
    embedders = [m for m in map(_EMBEDDER.fullmatch, view) if m]
    if not embedders:
        return Mismatch("no control_all_x_embedder.<patch>-<frames>.weight key")
    if "control_layers.0.before_proj.weight" not in view or "control_layers.0.attention.norm_q.weight" not in view:
        return Mismatch("it has a control embedder but no control_layers.0 block with before_proj", closeness=0.5)
    patch, frames = int(embedders[0].group(1)), int(embedders[0].group(2))
    dim, in_features = view.shape(embedders[0].group(0))
    head_dim = view.shape("control_layers.0.attention.norm_q.weight")[0]
    n_refiner = view.count_blocks("control_noise_refiner.")
    config_json = view.config_json or {}
    if "control_noise_refiner.0.before_proj.weight" in view:
        mode = "control_noise_refiner"
        if config_json.get("add_control_noise_refiner") == "control_layers" or _VERSION_2_0.search(
            Path(view.name).name
        ):
            mode = "control_layers"
    elif n_refiner:
        mode = "none"
    else:
        mode = "control_layers"
    places = config_json.get("control_layers_places")
    config = ZImageControlNetConfig(
        dim=dim,
        n_heads=dim // head_dim,
        norm_eps=float(config_json.get("norm_eps", 1e-5)),
        patch_size=patch,
        f_patch_size=frames,
        control_in_dim=in_features // (patch * patch * frames),
        n_control_layers=view.count_blocks("control_layers."),
        n_refiner_layers=0 if mode == "control_layers" else n_refiner,
        refiner=mode,
        control_layers_places=tuple(places) if places else None,
        control_refiner_layers_places=tuple(config_json.get("control_refiner_layers_places") or (0, 1)),
    )
    return Detection("videox-fun-2.0" if mode == "control_layers" and n_refiner else "videox-fun", config)


CONTROLNET_SPEC = ModelSpec(
    name="z-image.controlnet",
    family="z-image",
    model_class=ZImageControlNet,
    config_class=ZImageControlNetConfig,
    detect=detect_controlnet,
    formats={"videox-fun": None, "videox-fun-2.0": Recipe(drop(r"control_noise_refiner\..*"))},
    never_fp8=ZImageControlNet.ds_vram_never_fp8,
)
