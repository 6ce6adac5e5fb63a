"""The training run's loss curve as a picture: PIL only (no matplotlib), PNG bytes so that a run
folder on an object store can hold it.

    python -c "from tasks.train.curve import draw_loss_curve; from pathlib import Path; draw_loss_curve([('stage-1', [7, 6, 5.5])], Path('/tmp/loss.png'))"
"""
from __future__ import annotations

import io
from pathlib import Path


def draw_loss_curve(curves: list[tuple[str, list[float]]], path: Path, size=(640, 360)) -> Path:
    """Loss per optimizer step, stages one after another, drawn with PIL into a local file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(loss_curve_png(curves, size))
    return path


def loss_curve_png(curves: list[tuple[str, list[float]]], size=(640, 360)) -> bytes:
    """The loss curve as PNG bytes (drawn with PIL, no matplotlib): a run folder may be remote."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 50, w - 10, 20, h - 30
    d.rectangle([left, top, right, bottom], outline="black")
    values = [v for _, vs in curves for v in vs]
    if values:
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        n = len(values)
        colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]

        def xy(i, v):
            return (left + (right - left) * i / max(1, n - 1), bottom - (bottom - top) * (v - lo) / (hi - lo))

        i0 = 0
        for k, (name, vs) in enumerate(curves):
            pts = [xy(i0 + i, v) for i, v in enumerate(vs)]
            color = colors[k % len(colors)]
            if len(pts) > 1:
                d.line(pts, fill=color, width=2)
            else:
                d.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
            d.text((pts[0][0] + 3, top + 3 + 12 * k), name, fill=color)
            if i0:
                d.line([xy(i0, lo)[0], top, xy(i0, lo)[0], bottom], fill="#bbbbbb")
            i0 += len(vs)
        d.text((2, top), f"{hi:.2f}", fill="black")
        d.text((2, bottom - 10), f"{lo:.2f}", fill="black")
        d.text((left, bottom + 8), f"loss over {n} steps", fill="black")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
