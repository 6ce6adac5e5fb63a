"""Which asked shapes the generated pictures draw: caption agreement split by the kind asked.

caption_shape (tasks/evaluate/figures.py) is the share of a caption's (colour, kind) pairs that
the detector finds in the picture. This splits it by the asked kind (circle, star, ...), pooled
over the rows of a GENERATED dataset: each asked shape is drawn (its colour and kind found),
drawn in its colour as another kind (which kind: the largest region of that colour), or its
colour is missing. With `--through MOVQGAN` the same rows' scenes, encoded and decoded by that
MoVQGAN at the picture's size, are judged the same way: what a perfect transformer decoder would
reach with its codes, kind by kind. A kind far below its `through` share is the transformer's to
draw better; a kind low in both is lost in the codes.

    python -m tasks.evaluate.kinds out/a/generated [out/b/generated ...] [--tasks t2i control:canny]
        [--through assets/movqgan-tiny.safetensors] [--json kinds.json]
        [--sheet misses.png [--sheet-kind circle] [--sheet-rows 8]]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from tasks.config import EvaluateConfig
from tasks.evaluate.figures import caption_of, generated_picture, scene_of, shows_scene
from tasks.evaluate.job import open_generated
from tasks.shapes.detector import asked_shapes, detect_shapes
from tasks.shapes.scenes import KINDS

MIN_FRAC = EvaluateConfig().min_shape_frac  # the evaluation's smallest shape


class KindCounts:
    """Outcomes of asked shapes, pooled by asked kind."""

    def __init__(self):
        self.asked: Counter = Counter()
        self.drawn: Counter = Counter()
        self.colour_only: Counter = Counter()
        self.drawn_as: dict[str, Counter] = {k: Counter() for k in KINDS}

    def add(self, picture: np.ndarray, asked: list[tuple[str, str]], min_frac: float = MIN_FRAC) -> list:
        """Count one picture's asked shapes; returns the detector's findings in it."""
        found = detect_shapes(picture, min_frac)
        pairs = {(d.colour, d.kind) for d in found}
        for colour, kind in asked:
            self.asked[kind] += 1
            if (colour, kind) in pairs:
                self.drawn[kind] += 1
                continue
            same_colour = [d for d in found if d.colour == colour]
            if same_colour:
                self.colour_only[kind] += 1
                self.drawn_as[kind][max(same_colour, key=lambda d: d.area).kind] += 1
        return found

    def table(self) -> dict[str, dict]:
        out = {}
        for kind in KINDS:
            n = self.asked[kind]
            if not n:
                continue
            out[kind] = {"asked": n, "drawn": round(self.drawn[kind] / n, 4),
                         "colour_only": round(self.colour_only[kind] / n, 4),
                         "colour_missing": round((n - self.drawn[kind] - self.colour_only[kind]) / n, 4),
                         "drawn_as": dict(self.drawn_as[kind].most_common())}
        n = sum(self.asked.values())
        out["all"] = {"asked": n, "drawn": round(sum(self.drawn.values()) / n, 4) if n else 0.0}
        return out


def _through(movq, scene_image: np.ndarray) -> np.ndarray:
    from model.movqgan import to_uint8

    return to_uint8(movq.decode(movq.encode(scene_image[None])))[0]


_COLUMNS = ["id", "task", "upper", "lower", "caption", "params", "source", "width", "height"]


def asking_rows(ds, tasks: tuple[str, ...], limit: int | None = None):
    """(row, asked shapes) of a GENERATED dataset's rows of `tasks` whose caption asks for shapes,
    in the dataset's order; `limit`: only the first that many rows of those tasks are read."""
    task_column = ds.table(columns=["task"]).column("task").to_pylist()
    wanted = [i for i, task in enumerate(task_column) if task in tasks][:limit]
    if not wanted:
        return
    for row in ds.take(wanted, columns=_COLUMNS).to_pylist():
        asked = asked_shapes(caption_of(row))
        if asked:
            yield row, asked


def _missed(found: list, asked: list[tuple[str, str]], kind: str | None) -> list[str]:
    """The asked shapes (of `kind`, if given) not among the detector's findings `found`, each with
    what the picture shows in its colour instead."""
    out = []
    for colour, k in asked:
        if (kind and k != kind) or any(d.colour == colour and d.kind == k for d in found):
            continue
        same = [d for d in found if d.colour == colour]
        out.append(f"{colour} {k} ({'drawn as ' + max(same, key=lambda d: d.area).kind if same else 'colour missing'})")
    return out


def _example(row: dict, picture: np.ndarray, scene, through_image: np.ndarray | None, missed: list[str]) -> np.ndarray:
    """One row of the sheet: the scene, what the MoVQGAN makes of it, the generated picture, each
    with the detector's outlines and readings."""
    from tasks.evaluate.report import _labelled, _outlined, _tile

    tiles = [_tile(_outlined(scene.image, MIN_FRAC))] if scene is not None else []
    tiles += [_tile(_outlined(through_image, MIN_FRAC))] if through_image is not None else []
    tiles.append(_tile(_outlined(picture, MIN_FRAC)))
    head = "scene | through the MoVQGAN | generated" if through_image is not None else "scene | generated"
    return _labelled(tiles, [f"{row['task']}  {row['id']}   ({head})", caption_of(row), "missed: " + "; ".join(missed)])


def kind_agreement(uris: list[str], tasks: tuple[str, ...] = ("t2i",), through: str | None = None,
                   preset: str = "tiny", sheet: str | None = None, sheet_kind: str | None = None,
                   sheet_rows: int = 8) -> dict:
    """Per asked kind, how the GENERATED datasets' rows of `tasks` draw it (see the module); with
    `through`, also the rows' shapes scenes through that MoVQGAN. `sheet`: a PNG of up to
    `sheet_rows` rows that miss an asked shape (of `sheet_kind`, if given), drawn beside their scene."""
    bad = [t for t in tasks if not shows_scene(t)]
    if bad:
        raise ValueError(f"tasks {bad}: their pictures do not show the caption's scene (t2i and control:* do)")
    if sheet_kind is not None and sheet_kind not in KINDS:
        raise ValueError(f"sheet kind {sheet_kind!r}: expected one of {list(KINDS)}")
    examples: list[np.ndarray] = []
    movq = None
    if through:
        from model.movqgan import load_movqgan

        movq = load_movqgan(through, preset)
    generated, scenes = KindCounts(), KindCounts()
    rows_seen, scenes_seen = 0, 0
    for uri in uris:
        for row, asked in asking_rows(open_generated(uri, "kinds"), tasks):
            rows_seen += 1
            picture = generated_picture(row)
            found = generated.add(picture, asked)
            scene = scene_of(row) if movq is not None or sheet else None
            through_image = _through(movq, scene.image) if scene is not None and movq is not None else None
            if through_image is not None:
                scenes_seen += 1
                scenes.add(through_image, asked)
            if sheet and len(examples) < sheet_rows:
                missed = _missed(found, asked, sheet_kind)
                if missed:
                    examples.append(_example(row, picture, scene, through_image, missed))
    if not rows_seen:
        raise ValueError(f"{', '.join(uris)}: no {' or '.join(tasks)} rows whose caption asks for shapes")
    result = {"datasets": list(uris), "tasks": list(tasks), "rows": rows_seen, "generated": generated.table()}
    if movq is not None:
        result["through"] = {"movqgan": through, "rows": scenes_seen, **({"kinds": scenes.table()} if scenes_seen else {})}
    if sheet:
        from tasks.evaluate.report import _png, _stack

        Path(sheet).parent.mkdir(parents=True, exist_ok=True)
        Path(sheet).write_bytes(_png(_stack(examples, columns=1)))
        result["sheet"] = {"path": sheet, "rows": len(examples), "kind": sheet_kind}
    return result


def report_lines(ds, limit: int = 512, min_frac: float = MIN_FRAC) -> list[str]:
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


def format_table(result: dict) -> str:
    gen = result["generated"]
    through = result.get("through", {}).get("kinds", {})
    lines = [f"{result['rows']} rows ({', '.join(result['tasks'])}), {gen['all']['asked']} asked shapes"
             + (f"; through {result['through']['movqgan']}" if through else ""),
             f"{'kind':9s} {'asked':>5s} {'drawn':>6s} {'colour only':>11s} {'colour missing':>14s}"
             + (f" {'through':>8s}" if through else "") + "  drawn as, when not"]
    for kind, r in gen.items():
        if kind == "all":
            continue
        drawn_as = ", ".join(f"{k} {n}" for k, n in r["drawn_as"].items()) or "-"
        lines.append(f"{kind:9s} {r['asked']:5d} {r['drawn']:6.2f} {r['colour_only']:11.2f} {r['colour_missing']:14.2f}"
                     + (f" {through[kind]['drawn']:8.2f}" if kind in through else ("         " if through else ""))
                     + f"  {drawn_as}")
    lines.append(f"{'all':9s} {gen['all']['asked']:5d} {gen['all']['drawn']:6.2f}"
                 + (f" {'':11s} {'':14s} {through['all']['drawn']:8.2f}" if through else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="+", help="GENERATED datasets (folders or URIs), pooled")
    ap.add_argument("--tasks", nargs="+", default=["t2i"], help="the rows to judge (default t2i; control:* too)")
    ap.add_argument("--through", metavar="MOVQGAN", help="also judge the rows' scenes through this MoVQGAN")
    ap.add_argument("--preset", default="tiny", help="the MoVQGAN's preset (default tiny)")
    ap.add_argument("--sheet", metavar="PNG", help="draw rows that miss an asked shape here, beside their scenes")
    ap.add_argument("--sheet-kind", choices=KINDS, help="only rows that miss a shape of this kind")
    ap.add_argument("--sheet-rows", type=int, default=8, help="rows on the sheet (default 8)")
    ap.add_argument("--json", help="also save the result here")
    a = ap.parse_args(argv)
    try:
        result = kind_agreement(a.datasets, tuple(a.tasks), a.through, a.preset, a.sheet, a.sheet_kind, a.sheet_rows)
    except (ValueError, FileNotFoundError) as e:
        print(f"kinds: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if "sheet" in result:
        print(f"sheet: {result['sheet']['path']} ({result['sheet']['rows']} rows)")
    if a.json:
        from tasks.assets import save_result

        save_result({**result, "command": "python -m tasks.evaluate.kinds " + " ".join(argv or sys.argv[1:])}, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
