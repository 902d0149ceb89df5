"""The ``diffsynth`` command line; its entry point is ``ds_cli.main:main``."""

__all__: list[str] = []
