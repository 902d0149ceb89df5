"""save_video / load_video: H.264 mp4 read back by imageio-ffmpeg, metadata, atomic writes and the guards."""

from __future__ import annotations

import json
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from ds_pipelines import VideoFrames, load_video, save_video

WIDTH, HEIGHT = 48, 32


def make_frames(count: int = 9, fps: float | None = 16, parameters: dict | None = None) -> VideoFrames:
    frames = []
    y, x = np.meshgrid(np.linspace(0, 1, HEIGHT), np.linspace(0, 1, WIDTH), indexing="ij")
    for index in range(count):  # smooth gradients that move: H.264 keeps them within a few levels
        rgb = np.stack([(x + index / count) % 1, y, (x + y) / 2], axis=2)
        frames.append(Image.fromarray((rgb * 255).astype(np.uint8)))
    return VideoFrames(frames, fps=fps, parameters=parameters)


def ffmpeg_comment(path) -> str:
    dump = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return next(line for line in dump.splitlines() if line.startswith("comment="))


@pytest.mark.parametrize("fps", [16, 24])
def test_mp4_round_trip(tmp_path, fps):
    parameters = {"prompt": 'a "cat" = dog; #1 \\ done', "seed": 7, "steps": 2}
    frames = make_frames(parameters=parameters, fps=fps)
    path = save_video(frames, tmp_path / "out.mp4", progress_bar=False)  # fps and metadata from the frames
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    decoded = [np.frombuffer(data, np.uint8).reshape(HEIGHT, WIDTH, 3) for data in reader]
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["size"] == (WIDTH, HEIGHT) and meta["fps"] == fps and len(decoded) == len(frames)
    error = np.abs(np.stack(decoded).astype(int) - np.stack([np.asarray(f) for f in frames]).astype(int)).mean()
    assert error < 4, error
    assert '"seed": 7' in ffmpeg_comment(path)
    loaded = load_video(path)
    assert len(loaded) == 9 and loaded.fps == fps and loaded.parameters == parameters
    assert loaded[0].size == (WIDTH, HEIGHT)
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]  # no temporary file left beside it


def test_explicit_arguments_override_the_frames(tmp_path):
    frames = make_frames(count=5, parameters={"seed": 1})
    save_video(list(frames), tmp_path / "a.mp4", fps=8, metadata={"seed": 2}, progress_bar=False)
    loaded = load_video(tmp_path / "a.mp4", max_frames=3)
    assert loaded.fps == 8 and loaded.parameters == {"seed": 2} and len(loaded) == 3


class _Broken:
    size = (WIDTH, HEIGHT)

    def convert(self, mode):
        raise RuntimeError("frame cannot be read")


def test_a_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"old video")
    frames = [*make_frames(count=4), _Broken()]
    with pytest.raises(RuntimeError, match="frame cannot be read"):
        save_video(frames, target, fps=16, progress_bar=False)
    assert target.read_bytes() == b"old video"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


@pytest.mark.parametrize(
    ("frames", "kwargs", "message"),
    [
        ([], dict(fps=16), "no frames to write"),
        ("plain", dict(), "pass fps=... \\(these frames do not carry a frame rate\\)"),
        ("plain", dict(fps=0), "fps=0 must be > 0"),
        ("plain", dict(fps=16, quality=11), "quality=11 must be between 1 and 10"),
        ("odd", dict(fps=16), "frames are 47x32; H.264 yuv420p needs even sizes"),
        ("mixed", dict(fps=16), "frame 1 is 32x32, not 48x32"),
    ],
)
def test_guards(tmp_path, frames, kwargs, message):
    if frames == "plain":
        frames = list(make_frames(count=2))
    elif frames == "odd":
        frames = [Image.new("RGB", (47, 32))]
    elif frames == "mixed":
        frames = [Image.new("RGB", (48, 32)), Image.new("RGB", (32, 32))]
    with pytest.raises(ValueError, match=message):
        save_video(frames, tmp_path / "x.mp4", progress_bar=False, **kwargs)
    assert not list(tmp_path.iterdir())


def test_missing_folder_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"the folder .*nowhere does not exist"):
        save_video(make_frames(count=1), tmp_path / "nowhere" / "x.mp4", progress_bar=False)
    with pytest.raises(FileNotFoundError, match="video not found"):
        load_video(tmp_path / "none.mp4")


def test_missing_imageio_ffmpeg_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    with pytest.raises(ImportError, match=r"ds-pipelines\[video\]"):
        save_video(make_frames(count=1), tmp_path / "x.mp4", progress_bar=False)
    assert not list(tmp_path.iterdir())


def test_metadata_is_json(tmp_path):
    save_video(make_frames(count=1, parameters={"prompt": "x"}), tmp_path / "m.mp4", progress_bar=False)
    assert json.loads(ffmpeg_comment(tmp_path / "m.mp4")[len("comment=") :]) == {"prompt": "x"}
