"""``ControlNetInput``: one control condition for a pipeline's ``controlnet_inputs``, shared by every family.

A family's pipeline reads the fields and turns them into what its ControlNet takes (Z-Image's Fun ControlNet Union:
VAE latents of the control image, the mask and the masked picture; Qwen-Image's blockwise ControlNets: the latents
with a mask channel). What they share lives here: validation with errors that name the field, the step window,
and the images as tensors at the generation's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .media import image_to_tensor

__all__ = ["ControlNetInput", "as_controlnet_inputs"]

ImageLike = Image.Image | torch.Tensor


@dataclass(frozen=True, eq=False)  # compared by identity: images and tensors have no useful equality
class ControlNetInput:
    """One control condition.

    image: the control image (a canny, depth, pose or HED map; for ``control_type="inpaint"`` the picture to
        repaint): a PIL image, or a float tensor (3, H, W) or (1, 3, H, W) in [-1, 1] (``image_to_tensor``'s range).
        Any size: it is resized to the generation's size.
    scale: the strength; the ControlNet's residuals are multiplied by it (finite; 0 turns it off).
    start, end: the part of the schedule the ControlNet acts in, as fractions in [0, 1] with start < end. Step
        ``i`` of ``n`` covers [i/n, (i+1)/n] and runs with the ControlNet when that lies within [start, end]
        (diffusers' ``control_guidance_start``/``_end``). Upstream DiffSynth counts the other way (start=1, end=0).
    inpaint_mask: white (1) marks what to repaint; a PIL image (converted to grayscale) or a float tensor (H, W),
        (1, H, W) or (1, 1, H, W) in [0, 1].
    inpaint_image: the picture whose unmasked part is kept, when ``image`` is a control map (pose + inpaint);
        with ``control_type="inpaint"`` the picture is ``image`` itself. Needs ``inpaint_mask``.
    control_type: what the image is, for models that take a type ("canny", "depth", "pose", "hed", "inpaint", ...;
        stored lower case); None where the model needs none.
    controlnet_id: which of the pipeline's ControlNets takes this input, when it has several (index in load order).
    """

    image: ImageLike
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    inpaint_mask: ImageLike | None = None
    inpaint_image: ImageLike | None = None
    control_type: str | None = None
    controlnet_id: int = 0

    def __post_init__(self) -> None:
        _check_image("image", self.image, channels=3)
        self._check_window()
        if self.inpaint_mask is not None:
            _check_image("inpaint_mask", self.inpaint_mask, channels=1)
        if self.inpaint_image is not None:
            _check_image("inpaint_image", self.inpaint_image, channels=3)
            if self.inpaint_mask is None:
                raise ValueError("ControlNetInput.inpaint_image needs an inpaint_mask (white = repaint)")
        if self.control_type is not None:
            if not isinstance(self.control_type, str) or not self.control_type.strip():
                raise ValueError(
                    f"ControlNetInput.control_type={self.control_type!r} must be a non-empty string such as 'canny', "
                    "or None"
                )
            object.__setattr__(self, "control_type", self.control_type.strip().lower())
        if self.control_type == "inpaint" and self.inpaint_mask is None:
            raise ValueError("ControlNetInput.control_type='inpaint' needs an inpaint_mask (white = repaint)")
        if isinstance(self.controlnet_id, bool) or not isinstance(self.controlnet_id, int) or self.controlnet_id < 0:
            raise ValueError(f"ControlNetInput.controlnet_id={self.controlnet_id!r} must be an index of 0 or more")

    def _check_window(self) -> None:
        for name in ("scale", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"ControlNetInput.{name}={value!r} must be a finite number")
            object.__setattr__(self, name, float(value))
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"ControlNetInput.{name}={getattr(self, name)} must lie in [0, 1] (a fraction of the schedule)"
                )
        if self.start >= self.end:
            raise ValueError(
                f"ControlNetInput.start={self.start} must be below end={self.end}: the ControlNet acts from start to "
                "end of the schedule (0 = first step, 1 = last)"
            )

    # ------------------------------------------------------------------ the step window
    def active(self, step_index: int, total_steps: int) -> bool:
        """Whether the ControlNet acts at step ``step_index`` (0-based) of ``total_steps``."""
        if total_steps < 1 or not 0 <= step_index < total_steps:
            raise ValueError(f"step_index={step_index} is not a step of total_steps={total_steps}")
        tolerance = 1e-9 * total_steps  # 0.3 * 10 must count as 3
        after_start = step_index >= self.start * total_steps - tolerance
        return after_start and step_index + 1 <= self.end * total_steps + tolerance

    # ------------------------------------------------------------------ images as tensors
    @property
    def repaint_source(self) -> ImageLike | None:
        """The picture whose unmasked part an inpainting ControlNet keeps (None without a mask)."""
        if self.inpaint_mask is None:
            return None
        return self.inpaint_image if self.inpaint_image is not None else self.image

    def image_tensor(self, height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The control image as (1, 3, height, width) in [-1, 1], resized (LANCZOS, as diffusers) when needed."""
        return _pixels(self.image, height, width, dtype)

    def repaint_tensor(self, height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """``repaint_source`` as (1, 3, height, width) in [-1, 1], unmasked (the family decides how to blank the
        masked part); None without a mask."""
        source = self.repaint_source
        return None if source is None else _pixels(source, height, width, dtype)

    def mask_tensor(
        self, height: int, width: int, dtype: torch.dtype = torch.float32, binarize: bool = True
    ) -> torch.Tensor | None:
        """The inpaint mask as (1, 1, height, width) in [0, 1] (1 = repaint), thresholded at 0.5 when ``binarize``;
        None without a mask."""
        if self.inpaint_mask is None:
            return None
        mask = self.inpaint_mask
        if isinstance(mask, Image.Image):
            gray = mask.convert("L")
            if gray.size != (width, height):
                gray = gray.resize((width, height), Image.Resampling.LANCZOS)
            values = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(1, 1, height, width)
            tensor = values.to(torch.float32) / 255.0
        else:
            tensor = mask.to(torch.float32).reshape(1, 1, *mask.shape[-2:])
            if tuple(tensor.shape[-2:]) != (height, width):
                tensor = F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True).clamp(0, 1)
        if binarize:
            tensor = (tensor >= 0.5).to(torch.float32)
        return tensor.to(dtype)


def as_controlnet_inputs(value: Any, name: str = "controlnet_inputs") -> tuple[ControlNetInput, ...]:
    """A pipeline's ``controlnet_inputs`` argument as a tuple: None gives (), one ``ControlNetInput`` a 1-tuple."""
    if value is None:
        return ()
    if isinstance(value, ControlNetInput):
        return (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a ControlNetInput or a list of them, got {type(value).__name__}")
    bad = [i for i, item in enumerate(value) if not isinstance(item, ControlNetInput)]
    if bad:
        raise TypeError(f"{name}[{bad[0]}] is a {type(value[bad[0]]).__name__}, not a ControlNetInput")
    return tuple(value)


def _check_image(field: str, value: object, channels: int) -> None:
    if isinstance(value, Image.Image):
        if value.width < 1 or value.height < 1:
            raise ValueError(f"ControlNetInput.{field} is an empty image ({value.width}x{value.height})")
        return
    if not isinstance(value, torch.Tensor):
        kind = "a PIL image or a tensor"
        raise TypeError(f"ControlNetInput.{field} must be {kind}, got {type(value).__name__}")
    shapes = "(3, H, W) or (1, 3, H, W)" if channels == 3 else "(H, W), (1, H, W) or (1, 1, H, W)"
    leading = value.shape[:-2] if value.ndim >= 2 else None
    expected = {(3,), (1, 3)} if channels == 3 else {(), (1,), (1, 1)}
    if leading is None or tuple(leading) not in expected or min(value.shape[-2:]) < 1:
        raise ValueError(f"ControlNetInput.{field} has shape {tuple(value.shape)}; it must be {shapes}")
    if not value.is_floating_point():
        raise ValueError(f"ControlNetInput.{field} must be a float tensor, got {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"ControlNetInput.{field} holds NaN or Inf")
    low, high = (-1.0, 1.0) if channels == 3 else (0.0, 1.0)
    if value.numel() and (float(value.min()) < low - 1e-3 or float(value.max()) > high + 1e-3):
        raise ValueError(
            f"ControlNetInput.{field} has values in [{float(value.min()):.3g}, {float(value.max()):.3g}]; "
            f"it must lie in [{low:g}, {high:g}]"
        )


def _pixels(image: ImageLike, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(image, Image.Image):
        rgb = image.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
        return image_to_tensor(rgb, dtype)
    tensor = image.to(torch.float32).reshape(1, 3, *image.shape[-2:])
    if tuple(tensor.shape[-2:]) != (height, width):
        tensor = F.interpolate(tensor, size=(height, width), mode="bilinear", antialias=True).clamp(-1, 1)
    return tensor.to(dtype)
