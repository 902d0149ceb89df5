"""The tiny FLUX.1 and Wan repositories the pipeline tests build, shared with the examples' tests."""

import pytest

from tests.pipelines.conftest import flux_files  # noqa: F401  (session fixtures, re-exported)
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(fresh_accelerate_state):
    """Every test here starts and ends without accelerate state (see tests/conftest.py)."""
