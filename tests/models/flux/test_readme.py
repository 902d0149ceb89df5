"""The package README's example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[3] / "packages" / "ds-models-flux" / "README.md"


def test_readme_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README should have a python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
