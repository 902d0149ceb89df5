"""The tiny FLUX.1, Wan, Z-Image and Qwen-Image repositories (and ControlNet files) the pipeline tests build,
shared with the examples' tests."""

import pytest

from tests.examples.qwen_image_controlnets import qwen_image_controlnets  # noqa: F401
from tests.pipelines.conftest import flux_files  # noqa: F401  (session fixtures, re-exported)
from tests.pipelines.qwen_image_fixtures import qwen_image_files  # noqa: F401
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401
from tests.pipelines.z_image_controlnet_fixtures import z_image_controlnet_file  # noqa: F401
from tests.pipelines.z_image_fixtures import z_image_files  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Every test here starts and ends without accelerate state (see tests/conftest.py)."""
