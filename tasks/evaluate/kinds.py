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
from pathlib import Path

import numpy as np

from tasks.config import EvaluateConfig
from tasks.evaluate.figures import KindCounts, asking_rows, caption_of, generated_picture, scene_of, shows_scene
from tasks.evaluate.job import open_generated
from tasks.shapes.scenes import KINDS

MIN_FRAC = EvaluateConfig().min_shape_frac  # the evaluation's smallest shape


def _through(movq, scene_image: np.ndarray) -> np.ndarray:
    from model.movqgan import to_uint8

    return to_uint8(movq.decode(movq.encode(scene_image[None])))[0]


def _missed(asked: list[tuple[str, str]], read_as: list[str | None], kind: str | None) -> list[str]:
    """The asked shapes (of `kind`, if given) not drawn, each with what the picture shows in its
    colour instead (`read_as`: KindCounts.add's answer)."""
    return [f"{colour} {k} ({'drawn as ' + got if got else 'colour missing'})"
            for (colour, k), got in zip(asked, read_as) if got != k and (not kind or k == kind)]


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
            read_as = generated.add(picture, asked, MIN_FRAC)
            scene = scene_of(row) if movq is not None or sheet else None
            through_image = _through(movq, scene.image) if scene is not None and movq is not None else None
            if through_image is not None:
                scenes_seen += 1
                scenes.add(through_image, asked, MIN_FRAC)
            if sheet and len(examples) < sheet_rows:
                missed = _missed(asked, read_as, sheet_kind)
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
