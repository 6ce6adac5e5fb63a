"""What the evaluation's figures can reach through a given MoVQGAN: the figures of
tasks/evaluate/job.py for three "generators" on the same shapes scenes: the scene itself (the
figure's top), the scene passed through the MoVQGAN (encode, decode: the best any decoder can do
with these codes), and another scene (the unconditioned floor).

    .venv/bin/python -m bench.eval_ceiling                      # the shipped tiny MoVQGAN, 64 scenes
    .venv/bin/python -m bench.eval_ceiling --movqgan PATH --preset 270m --size 512

Control rows are scored at the panel size (size x size/2: a dual panel's lower half), caption
agreement on whole size x size pictures (t2i). Printed and saved to
bench/results/eval-ceiling.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tasks.panels.annotators import canny
from tasks.config import EvaluateConfig
from tasks.evaluate.figures import shapes_depth
from tasks.shapes.detector import agreement, asked_shapes, detect_shapes
from tasks.shapes.scenes import render_scene
from tasks.generate.verify import canny_f1, depth_rmse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--movqgan", default="assets/movqgan-tiny.safetensors")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--out", default="bench/results/eval-ceiling.json")
    args = ap.parse_args()

    from model.movqgan import load_movqgan, to_uint8

    movq = load_movqgan(args.movqgan, args.preset)
    min_frac = EvaluateConfig().min_shape_frac

    def through(image: np.ndarray) -> np.ndarray:
        return to_uint8(movq.decode(movq.encode(image[None])))[0]

    seeds = range(args.seed, args.seed + args.scenes)
    t0 = time.perf_counter()
    figures: dict[str, dict[str, list[float]]] = {}

    def add(metric: str, side: str, value: float) -> None:
        figures.setdefault(metric, {}).setdefault(side, []).append(value)

    panels = [render_scene(s, args.size, args.size // 2) for s in seeds]
    wholes = [render_scene(s, args.size, args.size) for s in seeds]
    for i, (p, w) in enumerate(zip(panels, wholes)):
        other_p, other_w = panels[(i + 1) % len(panels)], wholes[(i + 1) % len(wholes)]
        edges = canny(p.image)
        asked = asked_shapes(w.caption)
        for side, pic, whole in (("scene", p.image, w.image), ("movqgan", through(p.image), through(w.image)),
                                 ("other scene", other_p.image, other_w.image)):
            add("canny_f1 (control:canny)", side, canny_f1(edges, pic))
            add("depth_rmse (control:depth)", side, depth_rmse(shapes_depth(pic, p), p.depth_vis))
            agree = agreement(detect_shapes(whole, min_frac), asked)
            if agree is not None:
                add("caption_colour (t2i)", side, agree[0])
                add("caption_shape (t2i)", side, agree[1])
    table = {m: {side: round(float(np.mean(v)), 3) for side, v in sides.items()} for m, sides in figures.items()}
    result = {"bench": "eval_ceiling", "movqgan": Path(args.movqgan).name, "preset": args.preset,
              "scenes": args.scenes, "size": args.size, "seeds": [args.seed, args.seed + args.scenes - 1],
              "figures": table, "seconds": round(time.perf_counter() - t0, 1),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"{args.scenes} scenes at {args.size} px through {result['movqgan']}:")
    print(f"{'figure':30s} {'scene':>8s} {'movqgan':>8s} {'other':>8s}")
    for m, sides in table.items():
        print(f"{m:30s} {sides['scene']:8.3f} {sides['movqgan']:8.3f} {sides['other scene']:8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
