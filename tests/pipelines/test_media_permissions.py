"""Finished outputs are readable like any file the user writes, not private temporaries."""

import os
import stat

from PIL import Image

from ds_pipelines import save_image


def test_saved_image_gets_umask_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save_image(Image.new("RGB", (8, 8)), tmp_path / "out.png", {"prompt": "p"})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
