"""Panel throughput: the build_panels Ray Data job on 2 workers against a plain single-process loop.

    .venv/bin/python -m bench.panels                    # 500 JPEGs -> canny control panels at 512 px
    .venv/bin/python -m bench.panels --images 100       # a quick run

The bench first writes a folder of JPEG photos (800x600 renders of the shapes source with sensor
noise, so decoding and PNG encoding cost what they cost on photos) and a captions.jsonl, once; that
is not timed. Then, in one run, both sides build the same dataset from it with only the
control:canny task at stage 512: read + decode the JPEG, resize and centre-crop to its bucket,
Canny, render the prompt, PNG-encode both panels, write Arrow shards and commit the manifest.
- loop: tasks.panels.job.run_build(use_ray=False), one unit after another in this process;
- ray: the same run_build through map_units on a Ray Data actor pool of `--workers` actors.
Both use one OpenCV thread per process. Ray is started (and ray.data imported) before the clock
starts, as a long-lived cluster would be; starting the actor pool is inside the timed run. The
figures: end to end (all panels over the whole run) and steady state (after the first unit).
Results are printed and saved to bench/results/panels.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench import save_result
from storage import open_dataset
from tasks.panels.job import run_build
from tasks.config import load_config
from tasks.shapes.scenes import render_scene


def make_photos(folder: Path, count: int, width: int = 800, height: int = 600) -> Path:
    """count JPEG 'photos' and their captions; reused when the folder already holds them."""
    captions = folder / "captions.jsonl"
    if captions.is_file() and len(captions.read_text().splitlines()) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        scene = render_scene(i, width, height)
        noisy = scene.image.astype(np.float32) + rng.normal(0, 6, scene.image.shape)
        img = cv2.cvtColor(np.clip(noisy, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(folder / f"photo_{i:04d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        lines.append(json.dumps({"file": f"photo_{i:04d}.jpg", "caption": scene.caption}))
    captions.write_text("\n".join(lines) + "\n")
    return folder


def run_side(name: str, photos: Path, out: Path, workers: int, rows_per_unit: int, stage: int) -> dict:
    cfg = load_config(None, [
        f"workdir={out / name}", f"panels.source={{kind: folder, path: '{photos}'}}",
        "panels.tasks={control:canny: 1}", f"panels.stage_size={stage}", f"panels.rows_per_unit={rows_per_unit}",
        f"panels.workers={workers}", "ray.num_cpus=" + str(os.cpu_count() or 2),
    ])
    marks: list[tuple[float, int]] = []  # (time, rows done) after each committed unit
    units: list[dict] = []

    def progress(state: dict) -> None:
        marks.append((time.perf_counter(), state["rows_in"]))
        units.append(state["unit_counts"])

    t0 = time.perf_counter()
    summary = run_build(cfg, progress=progress, use_ray=name == "ray")
    seconds = time.perf_counter() - t0
    # Busy time of the units over the span they ran in: 2.0 = two workers busy all along.
    span = max(u["started"] + u["seconds"] for u in units) - min(u["started"] for u in units)
    busy = sum(u["seconds"] for u in units)
    ds = open_dataset(summary["dataset"])
    assert summary["rows_out"] == len(ds) and summary["rejects"] == 0, summary
    # Steady state: the rows after the first unit over the time after it (no start-up in it).
    (t_first, rows_first), (t_last, rows_last) = marks[0], marks[-1]
    steady = (rows_last - rows_first) / (t_last - t_first) if t_last > t_first else None
    return {"panels": summary["rows_out"], "seconds": round(seconds, 3),
            "panels_per_s": round(summary["rows_out"] / seconds, 2),
            "first_unit_after_s": round(t_first - t0, 3),
            "steady_panels_per_s": round(steady, 2) if steady else None,
            "unit_seconds_mean": round(busy / len(units), 3), "workers_seen": len({u["pid"] for u in units}),
            "concurrency": round(busy / span, 2),
            "bytes": sum(s["bytes"] for s in ds.shards)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows-per-unit", type=int, default=20)
    ap.add_argument("--stage", type=int, default=512)
    ap.add_argument("--photos", default=os.path.join(tempfile.gettempdir(), "panelforge-bench-photos"))
    ap.add_argument("--out", default="bench/results/panels.json")
    args = ap.parse_args()
    cv2.setNumThreads(1)

    t = time.perf_counter()
    photos = make_photos(Path(args.photos) / str(args.images), args.images)
    print(f"photos: {args.images} JPEGs in {photos} ({time.perf_counter() - t:.1f} s to prepare)")
    work = Path(tempfile.mkdtemp(prefix="panelforge-bench-"))
    import ray

    from tasks.ray_jobs import start_local_ray  # as the flows start Ray: loopback, token auth

    restore = start_local_ray(num_cpus=os.cpu_count() or 2, include_dashboard=False,
                              object_store_memory=256 * 2**20, log_to_driver=False)
    import ray.data  # noqa: F401 - a driver import (~3 s here), paid before the clock like the loop's imports
    load_before = os.getloadavg()
    try:
        loop = run_side("loop", photos, work, 1, args.rows_per_unit, args.stage)
        print(f"loop: {loop['panels']} panels in {loop['seconds']:.1f} s = {loop['panels_per_s']:.1f} panels/s")
        par = run_side("ray", photos, work, args.workers, args.rows_per_unit, args.stage)
        print(f"ray ({args.workers} workers): {par['panels']} panels in {par['seconds']:.1f} s = "
              f"{par['panels_per_s']:.1f} panels/s (first unit after {par['first_unit_after_s']:.1f} s)")
    finally:
        ray.shutdown()
        restore()
        shutil.rmtree(work, ignore_errors=True)
    ratio = par["panels_per_s"] / loop["panels_per_s"]
    steady = (par["steady_panels_per_s"] or 0) / (loop["steady_panels_per_s"] or float("inf"))
    print(f"speed-up: {ratio:.2f}x end to end, {steady:.2f}x in steady state, on {os.cpu_count()} cores "
          "(goal 1.7x)")
    result = {
        "bench": "panels", "task": "control:canny", "stage": args.stage, "images": args.images,
        "image_size": "800x600 JPEG q90", "workers": args.workers, "rows_per_unit": args.rows_per_unit,
        "loop": loop, "ray": par, "speedup": round(ratio, 3), "steady_speedup": round(steady, 3), "goal": 1.7,
        "cpus": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_result(result, args.out)


if __name__ == "__main__":
    main()
