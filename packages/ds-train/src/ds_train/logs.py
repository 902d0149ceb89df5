"""Run logs: ``log.csv`` (step, loss, lr, throughput), TensorBoard when installed, and a loss-curve PNG."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = ["RunLog", "draw_loss_curve", "read_log"]

FIELDS = ("step", "loss", "lr", "samples_per_s", "step_s", "elapsed_s")


class RunLog:
    """Appends rows to ``log.csv``; on resume, rows after the resumed step go first, so the file stays one curve."""

    def __init__(self, output: Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = output / "log.csv"
        rows = [row for row in read_log(self.path) if int(row["step"]) <= resume_step] if resume_step else []
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=resume_step or None)
            except ImportError:  # tensorboard not installed
                self.writer = None

    def log(self, step: int, loss: float, lr: float, samples_per_s: float, step_s: float, elapsed_s: float) -> None:
        row = {
            "step": step,
            "loss": f"{loss:.6g}",
            "lr": f"{lr:.6g}",
            "samples_per_s": f"{samples_per_s:.4g}",
            "step_s": f"{step_s:.4g}",
            "elapsed_s": f"{elapsed_s:.1f}",
        }
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, FIELDS).writerow(row)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/samples_per_s", samples_per_s, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(path: Path) -> list[dict[str, str]]:
    if not Path(path).is_file():
        return []
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def draw_loss_curve(log_path: Path, png_path: Path, width: int = 800, height: int = 400) -> Path | None:
    """The loss per step (thin grey) and its moving average (blue) on a plain axis, drawn with pillow."""
    rows = read_log(log_path)
    points = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss") and math.isfinite(float(r["loss"]))]
    if not points:
        return None
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 20, height - 40
    steps = [p[0] for p in points]
    losses = [p[1] for p in points]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(losses), max(losses)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def xy(step: float, loss: float) -> tuple[float, float]:
        return (
            left + (step - x0) / (x1 - x0) * (right - left),
            bottom - (loss - y0) / (y1 - y0) * (bottom - top),
        )

    draw.rectangle((left, top, right, bottom), outline="black")
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        value = y0 + fraction * (y1 - y0)
        y = bottom - fraction * (bottom - top)
        draw.line((left - 4, y, left, y), fill="black")
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
        step = x0 + fraction * (x1 - x0)
        x = left + fraction * (right - left)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x - 12, bottom + 8), f"{step:.0f}", fill="black")
    draw.text((left, height - 16), "step", fill="black")
    draw.text((left + 40, 4), "loss (grey) and moving average (blue)", fill="black")
    if len(points) > 1:
        draw.line([xy(s, v) for s, v in points], fill=(180, 180, 180), width=1)
        window = max(1, len(points) // 20)
        smooth = []
        for index in range(len(points)):
            chunk = losses[max(0, index - window + 1) : index + 1]
            smooth.append(xy(steps[index], sum(chunk) / len(chunk)))
        draw.line(smooth, fill=(30, 90, 200), width=2)
    else:
        x, y = xy(*points[0])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(30, 90, 200))
    png_path = Path(png_path)
    temporary = png_path.with_name(f".{png_path.name}.tmp")
    image.save(temporary, format="PNG")
    temporary.replace(png_path)
    return png_path
