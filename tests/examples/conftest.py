"""The tiny FLUX.1, Wan and Z-Image repositories (and Z-Image ControlNet file) the pipeline tests build, shared with
the examples' tests."""

import pytest

from tests.pipelines.conftest import flux_files  # noqa: F401  (session fixtures, re-exported)
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401
from tests.pipelines.z_image_controlnet_fixtures import z_image_controlnet_file  # noqa: F401
from tests.pipelines.z_image_fixtures import z_image_files  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Every test here starts and ends without accelerate state (see tests/conftest.py)."""
