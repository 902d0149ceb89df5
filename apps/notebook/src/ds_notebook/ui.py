"""``PipelineUI``: a small ipywidgets form around any pipeline, whose logic runs (and is tested) without a browser.

The widgets only hold values; ``generate()`` reads them, calls the pipeline, and puts the result and its
parameters back into widgets. Progress bars come from the pipeline (``tqdm.auto``: widget bars in Jupyter)
and are captured in the UI's output area.
"""

from __future__ import annotations

import inspect
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ipywidgets as widgets
from PIL import Image

from .display import show_video

__all__ = ["PipelineUI"]


class PipelineUI:
    """Prompt, negative prompt, seed, steps, size, LoRA scale, a Generate button, the result and its parameters.

    pipe: a loaded pipeline (``FluxImagePipeline``, ``WanVideoPipeline``, ...). loras: LoRA files to apply with
    the scale slider (re-applied when the scale changes). defaults: initial values (``height``, ``width``,
    ``num_inference_steps``, ``seed``, ``prompt``, ...). Show it by making ``ui`` (or ``ui.widget``) the last
    expression of a cell. ``ui.result`` is the last image or video frames.
    """

    def __init__(
        self, pipe: Any, loras: Sequence[str | os.PathLike] = (), defaults: dict[str, Any] | None = None
    ) -> None:
        defaults = dict(defaults or {})
        self.pipe = pipe
        self.loras = [Path(p) for p in loras]
        self.accepted = inspect.signature(type(pipe).__call__).parameters
        self.result: Any = None
        self.parameters: dict[str, Any] = {}
        self._applied_scale: float | None = None
        self.prompt = widgets.Textarea(value=defaults.get("prompt", ""), description="Prompt", rows=2)
        self.negative_prompt = widgets.Text(value=defaults.get("negative_prompt", ""), description="Negative")
        self.seed = widgets.IntText(value=defaults.get("seed", 0), description="Seed")
        self.steps = widgets.IntSlider(
            value=defaults.get("num_inference_steps", 30), min=1, max=100, description="Steps"
        )
        self.height = widgets.IntText(value=defaults.get("height", 1024), step=16, description="Height")
        self.width = widgets.IntText(value=defaults.get("width", 1024), step=16, description="Width")
        self.lora_scale = widgets.FloatSlider(
            value=defaults.get("lora_scale", 1.0),
            min=-1.0,
            max=2.0,
            step=0.05,
            description="LoRA scale",
            disabled=not self.loras,
        )
        self.button = widgets.Button(description="Generate", button_style="primary")
        self.button.on_click(lambda _button: self._clicked())
        self.image = widgets.Image(format="png")
        self.video = widgets.HTML()
        self.info = widgets.HTML()
        self.output = widgets.Output()
        controls = [self.prompt, self.negative_prompt, widgets.HBox([self.seed, self.steps])]
        controls += [widgets.HBox([self.width, self.height]), self.lora_scale, self.button]
        self.widget = widgets.VBox([*controls, self.output, self.image, self.video, self.info])

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _clicked(self) -> None:
        with self.output:
            self.output.clear_output()
            try:
                self.generate()
            except Exception as error:  # shown in the UI; the notebook keeps running
                self.info.value = f"<b>error:</b> {type(error).__name__}: {error}"

    def _apply_loras(self) -> None:
        if not self.loras or self._applied_scale == self.lora_scale.value:
            return
        self.pipe.clear_lora()
        for path in self.loras:
            self.pipe.load_lora(path, scale=self.lora_scale.value)
        self._applied_scale = self.lora_scale.value

    def call_options(self) -> dict[str, Any]:
        """The pipeline's keyword arguments from the widgets (only those its ``__call__`` accepts)."""
        options = {
            "negative_prompt": self.negative_prompt.value,
            "seed": self.seed.value,
            "num_inference_steps": self.steps.value,
            "height": self.height.value,
            "width": self.width.value,
        }
        return {name: value for name, value in options.items() if name in self.accepted}

    def generate(self) -> Any:
        """Run the pipeline with the widgets' values; fills ``result``, the image or video, and the parameters."""
        if not self.prompt.value.strip():
            raise ValueError("write a prompt first")
        self._apply_loras()
        options = self.call_options()
        self.button.disabled = True
        try:
            result = self.pipe(self.prompt.value, **options)
        finally:
            self.button.disabled = False
        self.result = result
        if isinstance(result, Image.Image):
            buffer = io.BytesIO()
            result.save(buffer, format="PNG")
            self.image.value = buffer.getvalue()
            self.video.value = ""
            self.parameters = json.loads(result.info.get("diffsynth", "{}"))
        else:  # video frames
            self.video.value = show_video(result).html
            self.image.value = b""
            self.parameters = dict(getattr(result, "parameters", {}) or {})
        if self.loras:
            self.parameters["loras"] = [{"file": p.name, "scale": self.lora_scale.value} for p in self.loras]
        rows = "".join(
            f"<tr><td><b>{k}</b></td><td>{v}</td></tr>" for k, v in self.parameters.items() if v is not None
        )
        self.info.value = f"<table>{rows}</table>"
        return result
