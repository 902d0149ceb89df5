"""ds-notebook: DiffSynth Studio in Jupyter: image grids, inline video, and a widget UI around any pipeline.

Progress bars: ds-pipelines draws them with ``tqdm.auto``, which renders as widgets in Jupyter and as text
elsewhere; nothing needs configuring.
"""

from .display import ImageGrid, VideoPlayer, show_images, show_video
from .ui import PipelineUI

__all__ = ["ImageGrid", "PipelineUI", "VideoPlayer", "show_images", "show_video"]
