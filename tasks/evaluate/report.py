"""The evaluation's report: report.md and its sheets, written next to the generated dataset.

    python -m tasks.evaluate.job --config configs/tiny.yaml     # writes them (this module has no CLI)

Files (in the dataset's folder or object-store prefix):
- report.md                the figures beside their floors, how each is measured, the images;
- figures.jsonl            every row's figures (what `panelforge compare` reads);
- contact_sheet.png        sample pairs, upper over lower (tasks/build_panels.contact_sheet);
- eval_control.png         control rows: the control map | the generated panel | what was compared
                           (canny: green = edges in both, red = in the map only, blue = generated
                           only; depth: the depth estimated from the generated panel);
- eval_captions.png        t2i rows: the picture with the detected shapes outlined and named.
"""
from __future__ import annotations

import json
import textwrap
from collections import Counter

import cv2
import numpy as np

from tasks.evaluate.figures import (METRICS, KindCounts, asking_rows, caption_of, generated_picture, scene_of,
                                    shapes_depth)
from tasks.panels.compose import decode_panel
from tasks.shapes.detector import detect_shapes
from tasks.generate.verify import binary_map, canny_edges

FIGURES = "figures.jsonl"  # every per-row figure: {"id", "task", "metric", "value", "floor"} a line
TILE = 160  # tile height in the sheets, pixels
_LABEL = 20
_BGR = {"red": (40, 40, 220), "orange": (20, 140, 245), "yellow": (30, 215, 245), "green": (70, 170, 40),
        "cyan": (215, 200, 30), "blue": (220, 80, 40), "purple": (190, 60, 140), "pink": (190, 120, 245)}


def _write(loc, name: str, data: bytes) -> str:
    """Write a file next to the dataset (local folder or object-store prefix); its path or URI."""
    target = loc.join(name)
    if loc.local:
        with open(target, "wb") as f:
            f.write(data)
        return target
    with loc.fs.open_output_stream(target) as f:
        f.write(data)
    return loc.display(name)


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("could not encode a sheet as PNG")
    return buf.tobytes()


def _tile(image: np.ndarray) -> np.ndarray:
    image = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    w = max(1, round(image.shape[1] * TILE / image.shape[0]))
    return cv2.resize(image, (w, TILE), interpolation=cv2.INTER_NEAREST if image.shape[0] < TILE else cv2.INTER_AREA)


def _labelled(tiles: list[np.ndarray], lines: list[str]) -> np.ndarray:
    """Tiles side by side with text lines above them."""
    body = np.concatenate([np.pad(t, ((0, 0), (2, 2), (0, 0)), constant_values=255) for t in tiles], 1)
    width = max(body.shape[1], 320)
    lines = [part for line in lines for part in textwrap.wrap(line, width // 7) or [""]]
    head = np.full((_LABEL * len(lines) + 4, width, 3), 255, np.uint8)
    for k, line in enumerate(lines):
        cv2.putText(head, line, (4, 15 + _LABEL * k), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1,
                    cv2.LINE_AA)
    body = np.pad(body, ((0, 0), (0, width - body.shape[1]), (0, 0)), constant_values=255)
    return np.pad(np.concatenate([head, body], 0), ((4, 4), (4, 4), (0, 0)), constant_values=225)


def _stack(blocks: list[np.ndarray], columns: int = 2) -> np.ndarray:
    if not blocks:
        sheet = np.full((60, 320, 3), 255, np.uint8)
        cv2.putText(sheet, "no rows of this kind", (8, 36), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
        return sheet
    h = max(b.shape[0] for b in blocks)
    w = max(b.shape[1] for b in blocks)
    blocks = [np.pad(b, ((0, h - b.shape[0]), (0, w - b.shape[1]), (0, 0)), constant_values=225) for b in blocks]
    blocks += [np.full_like(blocks[0], 225)] * (-len(blocks) % columns)
    return np.concatenate([np.concatenate(blocks[i:i + columns], 1) for i in range(0, len(blocks), columns)], 0)


def _edge_overlay(control: np.ndarray, generated: np.ndarray, low: int, high: int) -> np.ndarray:
    want, got = binary_map(control), canny_edges(generated, low, high)
    out = np.zeros(control.shape[:2] + (3,), np.uint8)
    out[want & got] = (0, 220, 0)
    out[want & ~got] = (230, 30, 30)
    out[~want & got] = (40, 90, 255)
    return out


def _outlined(image: np.ndarray, min_frac: float) -> np.ndarray:
    big = cv2.resize(image, (image.shape[1] * 2, image.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    bgr = cv2.cvtColor(big, cv2.COLOR_RGB2BGR)
    for d in detect_shapes(image, min_frac):
        cv2.drawContours(bgr, [d.contour * 2], -1, (255, 255, 255), 2)
        cv2.drawContours(bgr, [d.contour * 2], -1, (0, 0, 0), 1)
        x0, y0 = d.bbox[:2]
        cv2.putText(bgr, f"{d.colour} {d.kind}", (2 * x0, max(10, 2 * y0 - 2)), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def control_sheet(rows: list[dict], by_id: dict[str, dict], cfg, per_task: int) -> np.ndarray:
    ev = cfg.evaluate
    blocks, seen = [], {}
    for row in rows:
        task = row["task"]
        metric = "canny_f1" if task.endswith("canny") else "depth_rmse"
        rec = by_id.get((row["id"], metric))
        if rec is None or not task.startswith("control:") or seen.get(task, 0) >= per_task:
            continue
        seen[task] = seen.get(task, 0) + 1
        upper, lower = decode_panel(row["upper"]), decode_panel(row["lower"])
        if metric == "canny_f1":
            compared = _edge_overlay(upper, lower, ev.canny_low, ev.canny_high)
        else:
            scene = scene_of(row)
            compared = shapes_depth(lower, scene) if scene is not None else np.zeros_like(upper)
        name = "F1" if metric == "canny_f1" else "RMSE"
        blocks.append(_labelled([_tile(upper), _tile(lower), _tile(compared)], [
            f"{task}  {row['id']}", f"{name} {_fmt(rec['value'])}  (floor {_fmt(rec['floor'])})"]))
    return _stack(blocks)


def captions_sheet(rows: list[dict], by_id: dict[str, dict], cfg, count: int) -> np.ndarray:
    blocks = []
    for row in rows:
        rec = by_id.get((row["id"], "caption_shape"))
        if rec is None or row["task"] != "t2i" or len(blocks) >= count:
            continue
        colour = by_id.get((row["id"], "caption_colour"))
        image = decode_panel(row["upper"])
        lines = [f"t2i  {row['id']}", caption_of(row)]
        lines.append(f"colour {_fmt(colour['value'] if colour else None)}  shape {_fmt(rec['value'])}  "
                     f"(floors {_fmt(colour['floor'] if colour else None)}, {_fmt(rec['floor'])})")
        blocks.append(_labelled([_tile(image), _tile(_outlined(image, cfg.evaluate.min_shape_frac))], lines))
    return _stack(blocks)


def sampling_lines(ds) -> list[str]:
    """A table of how the rows were drawn: each task's distinct `sampling` records (guidance scale,
    min-p, ...) with their row counts, so a report says which settings its figures belong to."""
    t = ds.table(columns=["task", "sampling"])
    seen = Counter(zip(t.column("task").to_pylist(), (s or "{}" for s in t.column("sampling").to_pylist())))
    out = ["", "How the rows were drawn (each row's `sampling`):", "", "| task | rows | sampling |", "|---|---:|---|"]
    out += [f"| {task} | {n} | {_sampling_text(sampling)} |" for (task, sampling), n in sorted(seen.items())]
    return out


def _sampling_text(sampling: str) -> str:
    """One `sampling` record as "key value, ..." ("not recorded" if empty, "unreadable" if not a JSON object)."""
    try:
        fields = json.loads(sampling)
    except ValueError:
        return "unreadable"
    if not isinstance(fields, dict):
        return "unreadable"
    return ", ".join(f"{k} {v}" for k, v in sorted(fields.items())) or "not recorded"


def kinds_lines(ds, min_frac: float, limit: int = 512) -> list[str]:
    """report.md's table of a dataset's t2i rows by asked kind (the first `limit` t2i rows); none
    when no t2i row asks for shapes."""
    counts, rows = KindCounts(), 0
    for row, asked in asking_rows(ds, ("t2i",), limit):
        counts.add(generated_picture(row), asked, min_frac)
        rows += 1
    if not rows:
        return []
    table = counts.table()
    total = ds.rows_per_task().get("t2i", 0)
    read = f", the first {limit} of {total} t2i rows" if total > limit else ""
    lines = ["", f"## Asked shapes by kind (t2i, {rows} rows{read})", "",
             "Each shape a caption asks for: drawn (its colour and kind found), in its colour as another "
             "kind (the largest region of that colour, read as), or its colour missing "
             "(`python -m tasks.evaluate.kinds`; with `--through MOVQGAN` beside what the tokenizer alone "
             "keeps, and `--sheet` to see the misses).", "",
             "| asked kind | asked | drawn | as another kind | colour missing | read as, when not drawn |",
             "|---|---:|---:|---:|---:|---|"]
    for kind, r in table.items():
        if kind != "all":
            read_as = ", ".join(f"{k} {n}" for k, n in r["drawn_as"].items()) or "-"
            lines.append(f"| {kind} | {r['asked']} | {r['drawn']:.2f} | {r['colour_only']:.2f} "
                         f"| {r['colour_missing']:.2f} | {read_as} |")
    lines.append(f"| all | {table['all']['asked']} | {table['all']['drawn']:.2f} | | | |")
    return lines


def markdown(uri: str, ds, table: list[dict], errors: int, images: dict[str, str], kinds: list[str] = ()) -> str:
    """report.md's text; `kinds`: the lines of the asked-shapes-by-kind table (kinds_lines)."""
    fingerprints = sorted({m for m in ds.table(columns=["model_fingerprint"]).column(0).to_pylist() if m})
    lines = [
        f"# Evaluation: {uri}",
        "",
        f"{len(ds)} generated rows ({', '.join(f'{t} {n}' for t, n in sorted(ds.rows_per_task().items()))}); "
        f"model {', '.join(fingerprints) or 'unknown'}; {errors} rows could not be scored.",
        "",
        "| figure | task | rows | generated | ± se | floor (unconditioned) | ± se | better | paper |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['figure']} | {r['task']} | {r['rows']} | {_fmt(r['generated'])} | {_fmt(r.get('se'))} "
                     f"| {_fmt(r['floor'])} | {_fmt(r.get('floor_se'))} | {r['better']} | {r['paper']} |")
    lines += sampling_lines(ds)
    lines += kinds
    lines += [
        "",
        "How each figure is measured (tasks/evaluate/job.py):",
        "",
    ]
    lines += [f"- `{k}`: {text} ({better} is better)." for k, (text, better) in METRICS.items()]
    lines += [
        "- The floor: the same figure between this row's input (control map, caption) and the picture "
        "generated for another row of the same task: what an unconditioned sample scores.",
        "- ± se: the standard error of the mean (sample standard deviation / sqrt(rows)). Two runs whose "
        "figures differ by less than about twice their errors are not told apart; `panelforge compare` "
        "compares two runs row by row from their figures.jsonl.",
        "- Depth of a generated shapes picture: the scene is re-rendered from its seed; each of its colours "
        "found in the picture takes that shape's z, the rest the background plane.",
        "",
    ]
    for title, key in (("Sample pairs (upper over lower)", "contact_sheet"),
                       ("Control rows: map | generated | compared", "eval_control"),
                       ("Text-to-image: picture | detected shapes", "eval_captions")):
        if key in images:
            lines += [f"## {title}", "", f"![{key}]({images[key]})", ""]
    return "\n".join(lines)


def write_report(uri: str, ds, table: list[dict], records: list[dict], cfg, errors: int = 0) -> dict:
    """Write report.md, the contact sheet and the evaluation sheets; return their paths."""
    from storage import resolve
    from tasks.panels.job import contact_sheet

    loc = resolve(uri)
    per_task = max(1, cfg.evaluate.sheet_rows)
    by_id = {(r["id"], r["metric"]): r for r in records}
    ids = ds.table(columns=["id"]).column("id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    wanted = [i for i in order if any((ids[i], m) in by_id for m in METRICS)][: 40 * per_task]
    rows = ds.take(wanted).to_pylist() if wanted else []
    sheets = {
        "eval_control": _write(loc, "eval_control.png", _png(control_sheet(rows, by_id, cfg, per_task))),
        "eval_captions": _write(loc, "eval_captions.png", _png(captions_sheet(rows, by_id, cfg, 2 * per_task))),
    }
    sheet = contact_sheet(uri, cfg.generate.contact_sheet_pairs)
    images = {"contact_sheet": "contact_sheet.png", "eval_control": "eval_control.png",
              "eval_captions": "eval_captions.png"}  # relative: report.md sits beside them
    figures = _write(loc, FIGURES, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
    kinds = kinds_lines(ds, cfg.evaluate.min_shape_frac)
    report = _write(loc, "report.md", markdown(uri, ds, table, errors, images, kinds).encode())
    return {"report": report, "contact_sheet": sheet, "sheets": sheets, "figures": figures}

