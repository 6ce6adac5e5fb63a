"""The build_panels Ray Data job: source rows -> dual-panel rows (plus rejects), unit by unit.

    python -m tasks.panels.job configs/tiny.yaml panels.source.count=64   # the job alone, no Prefect

The driver lists deterministic work units (row ranges of the source) and skips those the dataset's
manifest already lists, so a rerun after an interruption finishes only the rest. Each unit runs on a
Ray Data actor (`PanelWorker`, annotators loaded once per worker): it reads its rows, makes one panel
or one reject per row, writes its shard with storage.write_shard and returns the small info dict
that the driver commits. Every input row ends up as exactly one panel row or one reject row.
`PanelMaker.run_unit` is the same work without Ray (the benchmark's single-process loop).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
import traceback
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from model.buckets import buckets_for, panel_size
from model.prompts import is_dual, render_prompt, split_task
from storage import PANELS, DatasetWriter, open_dataset, write_shard
from tasks.panels.annotators import Annotators
from tasks.config import PanelsConfig, PipelineConfig, load_config
from tasks.panels.compose import (Reject, bucket_for, check_prompt, clean_caption, decode_image, decode_panel, fit,
                          panel_row, read_bytes)
from tasks.shapes.scenes import edit_pair, render_scene, subject_pair
from tasks.panels.sources import open_source

log = logging.getLogger(__name__)

# Which tasks each kind of source row can become.
SOURCE_TASKS = {
    "shapes": lambda t: t in ("t2i", "edit", "subject") or (split_task(t)[1] in ("canny", "depth", "hed")),
    "folder": lambda t: split_task(t)[0] in ("t2i", "control", "dense"),
    "webdataset": lambda t: split_task(t)[0] in ("t2i", "control", "dense"),
    "parquet": lambda t: split_task(t)[0] in ("t2i", "control", "dense"),
    "edits": lambda t: t == "edit",
    "subjects": lambda t: t == "subject",
}
# Settings that do not change a single output byte; a resumed run may change them freely.
RUN_ONLY = {"workers", "num_gpus", "contact_sheet", "overwrite", "depth_device"}
_PHI = (math.sqrt(5) - 1) / 2


def effective_mix(pc: PanelsConfig, source_kind: str, annotators: Annotators) -> dict[str, float]:
    """The task weights this source can honour; raises ValueError when none is left."""
    if source_kind == "generated":
        return {}
    mix: dict[str, float] = {}
    for task, weight in pc.tasks.items():
        split_task(task)  # a typo in a task name is an error, not a silent zero
        if weight < 0:
            raise ValueError(f"panels.tasks.{task}: weight {weight} must be >= 0")
        if weight == 0 or not SOURCE_TASKS[source_kind](task):
            continue
        control = split_task(task)[1]
        if control and not annotators.available(control, exact_depth=source_kind == "shapes"):
            hint = ("install the pose extra (pip install .[pose])" if control == "pose"
                    else "set panels.depth_model to a local depth model folder")
            log.warning("panels: dropping %s from the mix: %s", task, hint)
            continue
        mix[task] = float(weight)
    if not mix:
        raise ValueError(f"panels.tasks {dict(pc.tasks)}: none of these tasks can be made from a {source_kind} "
                         "source; give at least one applicable task a positive weight")
    return mix


def pick_task(index: int, mix: dict[str, float]) -> str:
    """Row index -> task, in proportion to the weights. The golden-ratio sequence spreads tasks
    evenly (every task shows up within a few dozen rows) and needs no state: same row, same task."""
    u = (index * _PHI) % 1.0
    total = sum(mix.values())
    acc = 0.0
    for task, w in mix.items():
        acc += w / total
        if u < acc:
            return task
    return next(reversed(mix))


class PanelMaker:
    """Makes the panel rows of one source for one config; one per worker process."""

    def __init__(self, panels: dict):
        import cv2

        cv2.setNumThreads(1)  # one thread per worker: the job's parallelism is the workers
        self.pc = PanelsConfig.model_validate(panels)
        self.source = open_source(self.pc.source)
        self.ann = Annotators(self.pc.canny_low, self.pc.canny_high, self.pc.soft_edge_sigma,
                              self.pc.depth_model, self.pc.depth_device)
        self.mix = effective_mix(self.pc, self.source.kind, self.ann)
        self.buckets = buckets_for(self.pc.stage_size)

    # ------------------------------------------------------------ one row

    def _prompt(self, task: str, size: tuple[int, int], caption: str, ref: str, index: int, **kw) -> str:
        sized = not (task == "t2i" and ((index * _PHI * _PHI) % 1.0) < self.pc.t2i_unsized)
        prompt = render_prompt(task, size[0], size[1], caption, sized=sized, **kw)
        return check_prompt(prompt, self.pc.max_prompt_chars, ref)

    def _map(self, control: str, image: np.ndarray) -> np.ndarray:
        try:
            return self.ann(control, image)
        except Reject:
            raise
        except Exception as e:  # noqa: BLE001 - a model failing on one image must not stop the unit
            raise Reject("annotator_failed", f"the {control} annotator failed: {type(e).__name__}: {e}",
                         stage="annotate") from None

    def _row(self, item, task, bucket, upper, lower, caption, params, index, **prompt_kw) -> dict:
        prompt = self._prompt(task, bucket, caption, item.get("ref", item["id"]), index, **prompt_kw)
        params = dict(params, bucket=f"{bucket[0]}x{bucket[1]}", **prompt_kw)
        return panel_row(item["id"], task, prompt, caption, upper, lower, self.source.name,
                         json.dumps(params, sort_keys=True), self.pc.image_format, self.pc.png_level)

    def make(self, item: dict) -> dict:
        """One source row -> one PANELS row dict. Raises Reject for unusable input."""
        if item.get("error"):
            reason, detail = item["error"]
            raise Reject(reason, detail)
        kind = self.source.kind
        if kind == "generated":
            return self._generated(item)
        task = pick_task(item["index"], self.mix)
        if kind == "shapes":
            return self._shapes(item, task)
        if kind in ("folder", "webdataset", "parquet"):  # one captioned image per row
            return self._folder(item, task)
        return self._pair(item, task)

    def _shapes(self, item: dict, task: str) -> dict:
        seed, index = item["scene_seed"], item["index"]
        kind, control = split_task(task)
        # Rows spread over the stages of a staged training (panels.stage_sizes), else one stage.
        sizes = self.pc.stage_sizes or [self.pc.stage_size]
        stage = sizes[index % len(sizes)]
        buckets = self.buckets if stage == self.pc.stage_size else buckets_for(stage)
        bucket = (stage, stage) if self.source.aspect == "square" else buckets[seed % len(buckets)]
        pw, ph = panel_size(bucket, is_dual(task))
        params = {"scene_seed": seed}
        if kind in ("t2i", "control", "dense"):
            scene = render_scene(seed, pw, ph)
            params["shapes"] = _truth(scene.shapes)
            if kind == "t2i":
                return self._row(item, task, bucket, scene.image, None, scene.caption, params, index)
            params.update(self.ann.params(control))
            if control == "depth":
                params["annotator"] = "exact (each shape's z; near bright)"
                cmap = scene.depth_vis
            else:
                cmap = self._map(control, scene.image)
            upper, lower = (cmap, scene.image) if kind == "control" else (scene.image, cmap)
            return self._row(item, task, bucket, upper, lower, scene.caption, params, index)
        if kind == "edit":
            pair = edit_pair(seed, pw, ph)
            params.update(op=pair.op, shapes=_truth(pair.target.shapes), source_shapes=_truth(pair.source.shapes))
            return self._row(item, task, bucket, pair.source.image, pair.target.image, pair.source.caption,
                             params, index, instruction=pair.instruction)
        pair = subject_pair(seed, pw, ph)
        params["shapes"] = _truth(pair.scene.shapes)
        return self._row(item, task, bucket, pair.subject.image, pair.scene.image, pair.scene.caption,
                         params, index, subject=pair.description)

    def _load(self, path: str | bytes, ref: str, dual: bool, size: tuple | None = None):
        """Decode an image for a panel; returns (image, bucket, panel size). The bucket comes from
        the full-size header (a JPEG may decode smaller, never below its panel); `size` fixes
        (bucket, panel) instead, for the second image of a pair."""
        chosen = {}

        def panel_for(w: int, h: int) -> tuple[int, int]:
            chosen["size"] = size or bucket_for(w, h, self.pc.stage_size, dual)
            return chosen["size"][1]

        data = path if isinstance(path, bytes) else read_bytes(path, ref)  # shard sources hand over the bytes
        image = decode_image(data, ref, self.pc.max_pixels, panel_for)
        bucket, psize = chosen["size"]
        return fit(image, psize, ref, self.pc.max_upscale), bucket, psize

    def _folder(self, item: dict, task: str) -> dict:
        ref = item["ref"]
        caption = clean_caption(item.get("caption"), ref)
        image, bucket, _ = self._load(item["image"] if "image" in item else item["path"], ref, is_dual(task))
        kind, control = split_task(task)
        if kind == "t2i":
            return self._row(item, task, bucket, image, None, caption, {}, item["index"])
        cmap = self._map(control, image)
        upper, lower = (cmap, image) if kind == "control" else (image, cmap)
        return self._row(item, task, bucket, upper, lower, caption, self.ann.params(control), item["index"])

    def _pair(self, item: dict, task: str) -> dict:
        ref = item["ref"]
        what = "instruction" if task == "edit" else "subject"
        text = clean_caption(item.get("text"), ref, what)
        caption = clean_caption(item.get("caption"), ref)
        # The panel size follows the picture the model must produce (the lower panel).
        lower, bucket, psize = self._load(item["lower_path"], ref, dual=True)
        upper, _, _ = self._load(item["upper_path"], ref, dual=True, size=(bucket, psize))
        return self._row(item, task, bucket, upper, lower, caption, {}, item["index"], **{what: text})

    def _generated(self, item: dict) -> dict:
        ref = item["ref"]
        w, h, task = item["width"], item["height"], item["task"]
        if w % 32 or h % 32:
            raise Reject("bad_size", f"{ref}: {w}x{h} is not a multiple of 32", stage="compose")
        upper = decode_image(item["upper"], ref, self.pc.max_pixels)
        want = (h // 2, w) if item.get("lower") is not None else (h, w)
        lower = decode_image(item["lower"], ref, self.pc.max_pixels) if item.get("lower") is not None else None
        for name, img in (("upper", upper), ("lower", lower)):
            if img is not None and img.shape[:2] != want:
                raise Reject("bad_size", f"{ref}: the {name} panel is {img.shape[1]}x{img.shape[0]}, the row says "
                             f"{want[1]}x{want[0]}", stage="compose")
        check_prompt(item["prompt"], self.pc.max_prompt_chars, ref)
        params = json.loads(item.get("params") or "{}")
        params["generated"] = {k: item.get(k) for k in ("seed", "sampling", "model_fingerprint", "score")}
        # Already-encoded panels pass through untouched: re-encoding would only add loss or time.
        return {"id": item["id"], "task": task, "prompt": item["prompt"], "caption": item.get("caption"),
                "width": w, "height": h, "upper": item["upper"], "lower": item.get("lower"),
                "source": self.source.name, "params": json.dumps(params, sort_keys=True)}

    # ------------------------------------------------------------ one unit

    def run_unit(self, unit: dict, out: str) -> dict:
        """Make every row of a unit, write its shard and rejects; return the info to commit."""
        t0, started = time.perf_counter(), time.time()
        rows, rejects = [], []
        items = self.source.rows(unit["start"], unit["end"])
        for item in items:
            ref = item.get("ref", item["id"])
            try:
                rows.append(self.make(item))
            except Reject as r:
                rejects.append(r.row(ref))
            except Exception as e:  # noqa: BLE001 - one row's bug becomes its reject, never the job's crash
                tb = traceback.format_exc(limit=-2).strip().splitlines()[-1]
                rejects.append({"input_ref": ref, "stage": "compose", "reason": "internal_error",
                                "detail": f"{type(e).__name__}: {e} ({tb}); please report it"})
        table = pa.Table.from_pylist(rows, schema=PANELS) if rows else None
        info = write_shard(out, unit["unit"], table, rejects or None, kind="panels")
        # Which process ran it, and when (wall clock): how parallel a run really was.
        info["counts"] = {"rows_in": len(items), "rows_out": len(rows), "rejects": len(rejects),
                          "seconds": time.perf_counter() - t0, "pid": os.getpid(), "started": started}
        return info


class PanelWorker:
    """The Ray Data actor: one PanelMaker (and its models) per worker process."""

    def __init__(self, panels: dict, out: str):
        self.maker = PanelMaker(panels)
        self.out = out

    def __call__(self, unit: dict) -> dict:
        return self.maker.run_unit(unit, self.out)


def _truth(shapes: list[dict]) -> list[dict]:
    keep = ("kind", "colour", "centre", "size", "z", "bbox", "position")
    return [{k: s[k] for k in keep} for s in shapes]


def list_units(rows: int, rows_per_unit: int) -> list[dict]:
    if rows_per_unit < 1:
        raise ValueError(f"panels.rows_per_unit {rows_per_unit}: must be >= 1")
    return [{"unit": f"{k:05d}", "start": s, "end": min(s + rows_per_unit, rows)}
            for k, s in enumerate(range(0, rows, rows_per_unit))]


def dataset_uri(cfg: PipelineConfig) -> str:
    out = cfg.panels.output
    return out if "://" in out or out.startswith("/") else cfg.dataset_uri(out)


def run_build(cfg: PipelineConfig, progress: Callable[[dict], None] | None = None,
              use_ray: bool = True) -> dict:
    """Build (or finish) the panels dataset of a config; returns the summary (counts, no data).

    progress(state) is called after each committed unit; it may raise to stop the run (what an
    interruption looks like): the units committed so far stay done. use_ray=False runs the same
    units in this process, one after another.
    """
    pc = cfg.panels
    source = open_source(pc.source)
    mix = effective_mix(pc, source.kind, Annotators(depth_model=pc.depth_model))
    out = dataset_uri(cfg)
    units = list_units(len(source), pc.rows_per_unit)
    config = {k: v for k, v in pc.model_dump().items() if k not in RUN_ONLY}
    meta = {"stage_size": pc.stage_size, "stage_sizes": pc.stage_sizes, "source": source.name, "image_format": pc.image_format,
            "tasks": sorted(mix) if mix else ["(as generated)"]}
    writer = DatasetWriter(out, "panels", config=config, inputs=source.inputs(), meta=meta, overwrite=pc.overwrite)
    done = writer.done_units
    todo = [u for u in units if u["unit"] not in done]
    log.info("panels: %s rows from %s in %d units (%d already done) -> %s", len(source), source.name,
             len(units), len(units) - len(todo), out)
    t0 = time.perf_counter()
    state = {"units_total": len(units), "units_done": len(units) - len(todo), "rows_out": 0, "rejects": 0,
             "rows_in": 0}

    def results():
        if not todo:  # every unit is committed: a rerun loads no model and starts no Ray
            return
        if not use_ray:
            maker = PanelMaker(pc.model_dump())
            for u in todo:
                yield maker.run_unit(u, out)
            return
        from tasks.ray_jobs import map_units, ray_started

        with ray_started(cfg.ray):
            yield from map_units(todo, PanelWorker, actor_kwargs={"panels": pc.model_dump(), "out": out},
                                 num_workers=pc.workers, num_gpus=pc.num_gpus)

    for info in results():
        counts = info.pop("counts")
        writer.commit(info)
        state["units_done"] += 1
        for k in ("rows_in", "rows_out", "rejects"):
            state[k] += counts[k]
        state["seconds"] = time.perf_counter() - t0
        state["rows_per_s"] = state["rows_in"] / max(state["seconds"], 1e-9)
        log.info("panels: unit %s done (%d/%d units), %d rows and %d rejects this run, %.1f rows/s",
                 info["unit"], state["units_done"], state["units_total"], state["rows_out"], state["rejects"],
                 state["rows_per_s"])
        if progress is not None:
            progress(dict(state, unit=info["unit"], unit_counts=counts))
    seconds = time.perf_counter() - t0
    ds = open_dataset(out)
    rows_out, rejects = len(ds), sum(e["rows"] for e in ds.manifest["rejects"])
    summary = {
        "dataset": out,
        "source": source.name,
        "rows_in": len(source),
        "rows_out": rows_out,
        "rejects": rejects,
        "balanced": len(source) == rows_out + rejects,
        "rows_per_task": ds.rows_per_task(),
        "rejects_per_reason": ds.reject_counts(),
        "units_total": len(units),
        "units_skipped": len(units) - len(todo),
        "units_run": len(todo),
        "seconds": round(seconds, 3),
        "rows_per_s": round(state["rows_in"] / seconds, 2) if todo and seconds > 0 else None,
    }
    if not summary["balanced"]:
        log.error("panels: %d rows in but %d out + %d rejects", len(source), rows_out, rejects)
    writer.finalize(**{k: summary[k] for k in ("rows_in", "rows_out", "rejects", "balanced")})
    return summary


# ---------------------------------------------------------------- contact sheet


def contact_sheet(uri: str, count: int = 16, tile_height: int = 256, path: str | None = None,
                  max_width: int = 2400) -> str:
    """A PNG grid of sample panels (one of each task first), labelled with their task; returns its path."""
    import cv2

    from storage import resolve

    ds = open_dataset(uri)
    table = ds.table(columns=["id", "task", "upper", "lower"])
    tasks = table.column("task").to_pylist()
    first: dict[str, int] = {}
    for i, t in enumerate(tasks):
        first.setdefault(t, i)
    picks = sorted(first.values()) + [i for i in range(len(tasks)) if i not in first.values()]
    picks = picks[:count]
    tiles = []
    for i in picks:
        upper = decode_panel(table.column("upper")[i].as_py())
        lower_b = table.column("lower")[i].as_py()
        img = upper if lower_b is None else np.concatenate([upper, decode_panel(lower_b)], 0)
        if lower_b is not None:
            img[img.shape[0] // 2 - 1: img.shape[0] // 2 + 1] = (255, 0, 255)  # where the halves meet
        scale = tile_height / img.shape[0]
        img = cv2.resize(img, (max(1, round(img.shape[1] * scale)), tile_height), interpolation=cv2.INTER_AREA)
        label = np.full((22, max(img.shape[1], 150), 3), 255, np.uint8)
        text = f"{tasks[i]}  {table.column('id')[i].as_py()}"[: label.shape[1] // 8]
        cv2.putText(label, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        tile = np.full((tile_height + 22, label.shape[1], 3), 255, np.uint8)
        tile[:22] = label
        tile[22:, : img.shape[1]] = img
        tiles.append(np.pad(tile, ((4, 4), (4, 4), (0, 0)), constant_values=230))
    if not tiles:
        sheet = np.full((64, 256, 3), 255, np.uint8)
        cv2.putText(sheet, "no panels", (8, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.8, (0, 0, 0), 2)
    else:
        # Rows filled left to right up to max_width: tiles keep their own aspect ratio.
        rows, row, used = [], [], 0
        for t in tiles:
            if row and used + t.shape[1] > max_width:
                rows.append(row)
                row, used = [], 0
            row.append(t)
            used += t.shape[1]
        rows.append(row)
        width = max(sum(t.shape[1] for t in r) for r in rows)
        lines = [np.concatenate(r, 1) for r in rows]
        lines = [np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0)), constant_values=230) for x in lines]
        sheet = np.concatenate(lines, 0)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    loc = resolve(uri)
    target = path or loc.join("contact_sheet.png")
    if path is None and not loc.local:
        with loc.fs.open_output_stream(target) as f:
            f.write(buf.tobytes())
        return loc.display("contact_sheet.png")
    with open(target, "wb") as f:
        f.write(buf.tobytes())
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(sys.argv[1] if len(sys.argv) > 1 else "configs/tiny.yaml", sys.argv[2:])
    summary = run_build(cfg)
    summary["contact_sheet"] = contact_sheet(summary["dataset"], cfg.panels.contact_sheet)
    print(json.dumps(summary, indent=2))
