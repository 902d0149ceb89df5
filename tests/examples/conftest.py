"""The tiny FLUX.1 and Wan repositories the pipeline tests build, shared with the examples' tests."""

import pytest

from tests.pipelines.conftest import flux_files  # noqa: F401  (session fixtures, re-exported)
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change; a script run in a fresh
    interpreter starts without it, so each test here does too (and leaves none behind)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
