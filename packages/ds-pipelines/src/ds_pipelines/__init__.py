"""ds-pipelines: from prompt to pixels, and the sampling math that training shares."""

from .base import Pipeline, PipelineStepError, pipeline_step
from .flux_image import FluxImagePipeline
from .lora import LoraPiece, lora_layers, parse_lora, read_lora
from .media import image_to_tensor, save_image, tensor_to_images
from .schedulers import FLOW_MATCH_TEMPLATES, FlowMatchScheduler, FlowMatchTemplate, shift_sigmas

__all__ = [
    "FLOW_MATCH_TEMPLATES",
    "FlowMatchScheduler",
    "FlowMatchTemplate",
    "FluxImagePipeline",
    "LoraPiece",
    "Pipeline",
    "PipelineStepError",
    "image_to_tensor",
    "lora_layers",
    "parse_lora",
    "pipeline_step",
    "read_lora",
    "save_image",
    "shift_sigmas",
    "tensor_to_images",
]
