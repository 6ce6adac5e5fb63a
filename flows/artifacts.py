"""What the flows share for showing a job while it runs and after: a progress artifact fed by a
job's progress callback, and sheets inlined into markdown artifacts.

    progress = job_progress("panels-progress", "panels", line=..., fraction=...)
    summary = run_build(cfg, progress=progress)
    progress.finish()
"""
from __future__ import annotations

import base64
from typing import Callable

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from flows.retry import retry_transient


class job_progress:  # noqa: N801 - used like a function
    """A callable for a job's `progress=` argument: each snapshot updates the Prefect progress
    artifact `key` (percent from `fraction(snapshot)`, description from `line(snapshot)`) and logs
    "<label>: <line>". Call inside a task or flow run; `finish()` sets 100%, keeping the last line."""

    def __init__(self, key: str, label: str, line: Callable[[dict], str], fraction: Callable[[dict], float]):
        self.label, self.line, self.fraction = label, line, fraction
        self.logger = get_run_logger()
        self.last = "starting"
        self.bar = create_progress_artifact(0.0, key=key, description=f"{label}: {self.last}")

    def __call__(self, snapshot: dict) -> None:
        text = self.last = self.line(snapshot)
        pct = 100.0 * min(max(float(self.fraction(snapshot)), 0.0), 1.0)
        update_progress_artifact(self.bar, pct, description=f"{self.label}: {text}")
        self.logger.info("%s: %s", self.label, text)

    def finish(self) -> None:
        update_progress_artifact(self.bar, 100.0, description=f"{self.label}: done, {self.last}")


def units_fraction(state: dict) -> float:
    """Progress of the unit-based jobs (build_panels, pretokenize, evaluate): their snapshots
    carry units_done and units_total."""
    return state["units_done"] / max(state["units_total"], 1)


@task(name="contact-sheet", retries=1, retry_condition_fn=retry_transient)
def contact_sheet_task(uri: str, count: int) -> str:
    """Draw the contact sheet of a panels or generated dataset (contact_sheet.png beside it)."""
    from tasks.panels.job import contact_sheet

    return contact_sheet(uri, count)


def thumbnail_data_uri(path: str, width: int = 1200) -> str:
    """A small JPEG of a sheet, inline, so the artifact shows it without a file server ("" when the
    path is not a local image, e.g. an object-store sheet: the artifact links it instead)."""
    import cv2

    img = cv2.imread(path)
    if img is None:
        return ""
    if img.shape[1] > width:
        img = cv2.resize(img, (width, round(img.shape[0] * width / img.shape[1])), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


def image_markdown(name: str, path: str) -> list[str]:
    """Markdown lines naming a sheet's path and showing it."""
    return [f"{name}: `{path}`", "", f"![{name}]({thumbnail_data_uri(path) or path})", ""]
