"""``python -m ds_cli``: the same as the ``diffsynth`` command."""

import sys

from ds_cli.main import main

sys.exit(main())
