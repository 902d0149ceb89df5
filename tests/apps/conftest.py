"""The tiny FLUX.1 repository the pipeline tests build, shared with the CLI tests."""

from tests.pipelines.conftest import flux_files  # noqa: F401  (a session fixture, re-exported)
