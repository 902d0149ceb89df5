"""The tiny FLUX.1 and Wan repositories the pipeline tests build, shared with the app tests."""

from tests.pipelines.conftest import flux_files  # noqa: F401  (a session fixture, re-exported)
from tests.pipelines.wan_fixtures import wan_files  # noqa: F401  (a session fixture, re-exported)
