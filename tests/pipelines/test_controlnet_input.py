"""ControlNetInput: validation that names the field, the step window, and the images as tensors at a size."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from ds_pipelines import ControlNetInput
from ds_pipelines.controlnet import as_controlnet_inputs


def _image(width: int = 24, height: int = 16, color: tuple[int, int, int] = (255, 0, 0)) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def test_defaults_and_normalised_fields() -> None:
    control = ControlNetInput(_image(), scale=1, control_type="  Canny ")
    assert (control.scale, control.start, control.end) == (1.0, 0.0, 1.0)
    assert isinstance(control.scale, float)
    assert control.control_type == "canny"
    assert control.inpaint_mask is None and control.repaint_source is None
    assert control.controlnet_id == 0


@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"scale": math.nan}, ValueError, "scale"),
        ({"scale": math.inf}, ValueError, "scale"),
        ({"scale": "1"}, ValueError, "scale"),
        ({"scale": True}, ValueError, "scale"),
        ({"start": -0.1}, ValueError, "start"),
        ({"end": 1.5}, ValueError, "end"),
        ({"start": 0.5, "end": 0.5}, ValueError, "start"),
        ({"start": 0.8, "end": 0.2}, ValueError, "start"),
        ({"control_type": ""}, ValueError, "control_type"),
        ({"control_type": 3}, ValueError, "control_type"),
        ({"control_type": "inpaint"}, ValueError, "control_type"),
        ({"inpaint_image": _image()}, ValueError, "inpaint_image"),
        ({"inpaint_mask": "mask.png"}, TypeError, "inpaint_mask"),
        ({"inpaint_mask": torch.zeros(3, 8, 8)}, ValueError, "inpaint_mask"),
        ({"inpaint_mask": torch.full((8, 8), 2.0)}, ValueError, "inpaint_mask"),
        ({"controlnet_id": -1}, ValueError, "controlnet_id"),
    ],
)
def test_bad_fields_are_named(kwargs: dict, error: type[Exception], field: str) -> None:
    with pytest.raises(error, match=f"ControlNetInput.{field}"):
        ControlNetInput(_image(), **kwargs)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("control.png", "must be a PIL image or a tensor"),
        (torch.zeros(4, 8, 8), r"shape \(4, 8, 8\)"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), "float tensor"),
        (torch.full((3, 8, 8), math.nan), "NaN or Inf"),
        (torch.full((3, 8, 8), 255.0), r"must lie in \[-1, 1\]"),
    ],
)
def test_bad_images_are_named(image: object, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=f"ControlNetInput.image.*{message}"):
        ControlNetInput(image)


def test_frozen() -> None:
    control = ControlNetInput(_image())
    with pytest.raises(AttributeError):
        control.scale = 2.0  # type: ignore[misc]


def test_active_window_follows_diffusers_control_guidance() -> None:
    steps = 8
    whole = ControlNetInput(_image())
    assert all(whole.active(i, steps) for i in range(steps))
    first_half = ControlNetInput(_image(), end=0.5)
    assert [first_half.active(i, steps) for i in range(steps)] == [True] * 4 + [False] * 4
    # diffusers keeps step i when not (i / n < start or (i + 1) / n > end)
    for start, end in [(0.0, 0.3), (0.3, 1.0), (0.25, 0.75), (0.1, 0.9)]:
        control = ControlNetInput(_image(), start=start, end=end)
        for n in (3, 8, 10):
            expected = [not (i / n < start or (i + 1) / n > end) for i in range(n)]
            assert [control.active(i, n) for i in range(n)] == expected, (start, end, n)
    assert ControlNetInput(_image(), start=0.3).active(3, 10)  # 0.3 * 10 is 3.0000000000000004 in floats
    with pytest.raises(ValueError, match="step_index=8"):
        whole.active(8, steps)


def test_image_tensor_resizes_pil_and_tensors() -> None:
    control = ControlNetInput(_image(24, 16, (255, 0, 0)))
    pixels = control.image_tensor(32, 48)
    assert pixels.shape == (1, 3, 32, 48) and pixels.dtype == torch.float32
    torch.testing.assert_close(pixels[0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]))
    same = ControlNetInput(_image(48, 32)).image_tensor(32, 48, dtype=torch.bfloat16)
    assert same.dtype == torch.bfloat16
    tensor = torch.rand(3, 16, 24) * 2 - 1
    exact = ControlNetInput(tensor).image_tensor(16, 24)
    torch.testing.assert_close(exact, tensor.unsqueeze(0))
    assert ControlNetInput(tensor).image_tensor(32, 48).shape == (1, 3, 32, 48)


def test_mask_and_repaint_tensors() -> None:
    mask = Image.new("L", (24, 16), 0)
    mask.paste(255, (0, 0, 12, 16))  # left half: repaint
    picture = _image(24, 16, (0, 0, 255))
    pose_and_inpaint = ControlNetInput(_image(), inpaint_mask=mask, inpaint_image=picture)
    tensor = pose_and_inpaint.mask_tensor(16, 24)
    assert tensor.shape == (1, 1, 16, 24)
    assert tensor[0, 0, :, :12].eq(1).all() and tensor[0, 0, :, 12:].eq(0).all()
    assert pose_and_inpaint.repaint_source is picture
    torch.testing.assert_close(pose_and_inpaint.repaint_tensor(16, 24)[0, :, 0, 0], torch.tensor([-1.0, -1.0, 1.0]))
    inpaint = ControlNetInput(picture, inpaint_mask=torch.full((16, 24), 0.7), control_type="inpaint")
    assert inpaint.repaint_source is picture
    assert inpaint.mask_tensor(8, 12).eq(1).all()
    assert inpaint.mask_tensor(16, 24, binarize=False).sub(0.7).abs().max() < 1e-6
    assert ControlNetInput(picture).mask_tensor(16, 24) is None


def test_as_controlnet_inputs() -> None:
    control = ControlNetInput(_image())
    assert as_controlnet_inputs(None) == ()
    assert as_controlnet_inputs(control) == (control,)
    assert as_controlnet_inputs([control, control]) == (control, control)
    with pytest.raises(TypeError, match=r"controlnet_inputs\[1\] is a str"):
        as_controlnet_inputs([control, "canny.png"])
    with pytest.raises(TypeError, match="controlnet_inputs must be"):
        as_controlnet_inputs("canny.png")
