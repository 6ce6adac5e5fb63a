"""What the evaluation's figures can reach through a given MoVQGAN: the figures of
tasks/evaluate/job.py for three "generators" on the same shapes scenes: the scene itself (the
figure's top), the scene passed through the MoVQGAN (encode, decode: the best any decoder can do
with these codes), and another scene (the unconditioned floor).

    .venv/bin/python -m bench.eval_ceiling                      # the shipped tiny MoVQGAN, 64 scenes
    .venv/bin/python -m bench.eval_ceiling --movqgan PATH --preset 270m --size 512
    .venv/bin/python -m bench.eval_ceiling --movqgan NEW --codes-vs assets/movqgan-tiny.safetensors

Control rows are scored at the panel size (size x size/2: a dual panel's lower half), caption
agreement on whole size x size pictures (t2i). Printed and saved to
bench/results/eval-ceiling.json.

It splits the MoVQGAN side's canny F1 into edge precision and recall (exact and within a pixel), and
the recall of the scene's edges on shape outlines and elsewhere (background patterns).

It also measures how local the codes are: the share of a dual image's lower-panel codes that
stay the same when its upper panel is swapped for another scene's ("codes kept"). A transformer
decoder learns one code per look of a patch only when that share is high; the encoder's
GroupNorm statistics and attention span the whole picture, so it need not be.

--codes-vs OTHER also says how many of the codes --movqgan gives these scenes (panels and whole
pictures) OTHER gives too, at the same place: after a fine-tune that changed the codes, how much
of what a transformer decoder learned on OTHER's codes still applies.

--vs BEFORE scores the same panels through BEFORE too and gives the canny F1 difference from
BEFORE to --movqgan paired by scene (mean ± standard error, scenes higher and lower): two files
64 scenes apart by 0.01 are told apart by that, not by their two means.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from bench import save_result
from tasks.panels.annotators import canny
from tasks.config import EvaluateConfig
from tasks.evaluate.figures import shapes_depth
from tasks.shapes.detector import agreement, asked_shapes, detect_shapes
from tasks.shapes.scenes import render_scene
from tasks.evaluate.edges import add_counts, new_counts, pooled
from tasks.evaluate.job import mean_se
from tasks.generate.verify import binary_map, canny_edges, canny_f1, depth_rmse


def codes_kept(movq, images: list[np.ndarray], codes: list | None = None) -> list[float]:
    """For each picture, the share of its lower half's codes that stay the same when its upper half
    is swapped for the next picture's (a panel's codes should not depend on the panel beside it).
    `codes`: the pictures' own codes, if already encoded."""
    kept = []
    for i, image in enumerate(images):
        own = codes[i] if codes is not None else movq.encode(image[None])
        swapped = image.copy()
        swapped[: image.shape[0] // 2] = images[(i + 1) % len(images)][: image.shape[0] // 2]
        rows = own.shape[1] // 2  # code rows of one panel
        kept.append((own[0, rows:] == movq.encode(swapped[None])[0, rows:]).float().mean().item())
    return kept


def outline_mask(labels: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels within `width` of a boundary between two regions of a scene's label map (shape
    outlines, including where shapes overlap); the rest is inside a shape or plain background."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    return cv2.dilate(edge.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)) > 0


# Reference degradations of the same panels: what canny F1 a picture keeps at a given PSNR when
# its errors are of a familiar kind (how far the MoVQGAN's 0.47 is from the 0.6, in dB).
def _jpeg(quality: int):
    return lambda im: cv2.imdecode(cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, quality])[1], cv2.IMREAD_UNCHANGED)


def _resampled(factor: int):
    def f(im):
        h, w = im.shape[:2]
        small = cv2.resize(im, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return f


REFERENCES = {"jpeg q90": _jpeg(90), "jpeg q80": _jpeg(80), "jpeg q60": _jpeg(60),
              "2x down, bicubic up": _resampled(2), "4x down, bicubic up": _resampled(4)}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / mse) if mse > 0 else float("inf")


def reference_figures(images: list[np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean canny F1 (against the picture's own canny) and PSNR of each reference degradation."""
    edges = [canny(im) for im in images]
    out = {}
    for name, degrade in REFERENCES.items():
        f1, db = [], []
        for im, im_edges in zip(images, edges):
            d = degrade(im)
            f1.append(canny_f1(im_edges, d))
            db.append(psnr(im, d))
        out[name] = {"canny_f1": round(float(np.mean(f1)), 3), "panel_psnr_db": round(float(np.mean(db)), 2)}
    return out


def paired_difference(new: list[float], old: list[float]) -> dict:
    """new - old, paired by scene: the mean, its standard error, and how many scenes rose and fell."""
    d = np.asarray(new, float) - np.asarray(old, float)
    if d.size < 2:
        raise ValueError(f"a paired difference needs two scenes or more, got {d.size}")
    mean, se = mean_se(d)  # as panelforge compare pairs two runs' rows
    return {"difference": round(mean, 4), "se": round(se, 4), "higher": int((d > 0).sum()), "lower": int((d < 0).sum())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--movqgan", default="assets/movqgan-tiny.safetensors")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--scenes", type=int, default=64)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=5000)
    ap.add_argument("--codes-vs", default=None, metavar="OTHER", help="a MoVQGAN (same preset) whose codes to compare")
    ap.add_argument("--vs", default=None, metavar="BEFORE",
                    help="another MoVQGAN: the canny F1 difference, paired by scene, from BEFORE to --movqgan")
    ap.add_argument("--out", default="bench/results/eval-ceiling.json")
    args = ap.parse_args(argv)

    from model.movqgan import load_movqgan, to_uint8

    try:  # every MoVQGAN named, before any work: a wrong path or preset costs nothing
        movq, before, other = (load_movqgan(path, args.preset) if path else None
                               for path in (args.movqgan, args.vs, args.codes_vs))
    except (OSError, ValueError) as e:
        ap.error(str(e))
    before_f1: list[float] = []
    min_frac = EvaluateConfig().min_shape_frac

    seeds = range(args.seed, args.seed + args.scenes)
    t0 = time.perf_counter()
    figures: dict[str, dict[str, list[float]]] = {}

    def add(metric: str, side: str, value: float) -> None:
        figures.setdefault(metric, {}).setdefault(side, []).append(value)

    panels = [render_scene(s, args.size, args.size // 2) for s in seeds]
    wholes = [render_scene(s, args.size, args.size) for s in seeds]
    # each picture encoded once: its codes give the reconstruction and the code comparisons below
    panel_codes = [movq.encode(p.image[None]) for p in panels]
    edge_counts = new_counts()  # where the movqgan side's canny F1 is lost (tasks.evaluate.edges)
    region_counts = {"shape_outlines": new_counts(), "elsewhere": new_counts()}  # recall of the scene's edges by where they are
    whole_codes = [movq.encode(w.image[None]) for w in wholes]
    panel_psnr, latent_f1, latent_psnr, rounding = [], [], [], []
    for i, (p, w) in enumerate(zip(panels, wholes)):
        other_p, other_w = panels[(i + 1) % len(panels)], wholes[(i + 1) % len(wholes)]
        edges = canny(p.image)
        asked = asked_shapes(w.caption)
        through_p, through_w = (to_uint8(movq.decode(c))[0] for c in (panel_codes[i], whole_codes[i]))
        found, scene_edges = canny_edges(through_p), binary_map(edges)
        panel_psnr.append(psnr(p.image, through_p))
        z = movq.latent(p.image[None])  # what the codebook's rounding costs: the latent unquantized
        with torch.inference_mode():
            rounding.append(float(((z - movq.quantize.lookup(panel_codes[i]).float()) ** 2).mean() / z.var()))
        unrounded = to_uint8(movq.decode_latent(z))[0]
        latent_f1.append(canny_f1(edges, unrounded))
        latent_psnr.append(psnr(p.image, unrounded))
        add_counts(edge_counts, found, scene_edges)
        if before is not None:
            before_f1.append(canny_f1(edges, to_uint8(before.decode(before.encode(p.image[None])))[0]))
        outline = outline_mask(p.labels)
        for region, mask in (("shape_outlines", outline), ("elsewhere", ~outline)):
            add_counts(region_counts[region], found, scene_edges & mask)
        for side, pic, whole in (("scene", p.image, w.image), ("movqgan", through_p, through_w),
                                 ("other scene", other_p.image, other_w.image)):
            add("canny_f1 (control:canny)", side, canny_f1(edges, pic))
            add("depth_rmse (control:depth)", side, depth_rmse(shapes_depth(pic, p), p.depth_vis))
            agree = agreement(detect_shapes(whole, min_frac), asked)
            if agree is not None:
                add("caption_colour (t2i)", side, agree[0])
                add("caption_shape (t2i)", side, agree[1])
    table = {m: {side: round(float(np.mean(v)), 3) for side, v in sides.items()} for m, sides in figures.items()}
    by_texture: dict[str, list[float]] = {}  # the MoVQGAN side's canny F1 by the scene's background
    for p, f1 in zip(panels, figures["canny_f1 (control:canny)"]["movqgan"]):
        by_texture.setdefault(p.background["texture"], []).append(f1)
    kept = codes_kept(movq, [w.image for w in wholes], whole_codes)
    result = {"bench": "eval_ceiling", "movqgan": Path(args.movqgan).name, "preset": args.preset,
              "scenes": args.scenes, "size": args.size, "seeds": [args.seed, args.seed + args.scenes - 1],
              "figures": table, "codes_kept_when_the_other_panel_changes": round(float(np.mean(kept)), 4),
              "edges_through_movqgan": {"tolerance_px": 1, **pooled(edge_counts)},
              "scene_edges_found_through_movqgan": {
                  region: {"scene_edge_pixels": n["map"], "recall": got["exact"]["recall"],
                           "recall_within_1px": got["within_tolerance"]["recall"]}
                  for region, n in region_counts.items() for got in [pooled(n)]},
              "canny_f1_by_background": {t: {"scenes": len(v), "movqgan": round(float(np.mean(v)), 3)}
                                         for t, v in sorted(by_texture.items())},
              "panel_psnr_db": round(float(np.mean(panel_psnr)), 2),
              "codes_used": int(len(set(torch.cat([c.flatten() for c in panel_codes]).tolist()))),
              "codebook_rounding": {  # the latent's squared distance to its code, over its variance
                  "error_share": round(float(np.mean(rounding)), 5),
                  "canny_f1_unquantized": round(float(np.mean(latent_f1)), 3),
                  "panel_psnr_db_unquantized": round(float(np.mean(latent_psnr)), 2)},
              "references": reference_figures([p.image for p in panels])}
    if other is not None:
        same = [(c == other.encode(x.image[None])).float().mean().item()
                for c, x in zip(panel_codes + whole_codes, panels + wholes)]
        result["codes_same_as"] = {"movqgan": Path(args.codes_vs).name, "fraction": round(float(np.mean(same)), 4)}
    if before is not None:
        result["canny_f1_paired"] = {"before": Path(args.vs).name, "before_f1": round(float(np.mean(before_f1)), 4),
                                     **paired_difference(figures["canny_f1 (control:canny)"]["movqgan"], before_f1)}
    result.update(seconds=round(time.perf_counter() - t0, 1), when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(f"{args.scenes} scenes at {args.size} px through {result['movqgan']}:")
    print(f"{'figure':30s} {'scene':>8s} {'movqgan':>8s} {'other':>8s}")
    for m, sides in table.items():
        print(f"{m:30s} {sides['scene']:8.3f} {sides['movqgan']:8.3f} {sides['other scene']:8.3f}")
    e = result["edges_through_movqgan"]
    print(f"canny edges through the MoVQGAN, pooled: {e['edge_pixels_generated_per_map_pixel']:.2f} per edge of the "
          f"scene; precision {e['exact']['precision']:.3f} exact, {e['within_tolerance']['precision']:.3f} within 1 px; "
          f"recall {e['exact']['recall']:.3f} exact, {e['within_tolerance']['recall']:.3f} within 1 px")
    for region, r in result["scene_edges_found_through_movqgan"].items():
        print(f"  the scene's edges {region.replace('_', ' ')} ({r['scene_edge_pixels']} pixels): recall "
              f"{r['recall']:.3f} exact, {r['recall_within_1px']:.3f} within 1 px")
    print("the MoVQGAN side's canny F1 by background: " + ", ".join(
        f"{t} {r['movqgan']:.3f} ({r['scenes']})" for t, r in result["canny_f1_by_background"].items()))
    r = result["codebook_rounding"]
    print(f"panels through the MoVQGAN: {result['panel_psnr_db']:.2f} dB, {result['codes_used']} codes used; "
          f"the latent unquantized: canny F1 {r['canny_f1_unquantized']:.3f}, {r['panel_psnr_db_unquantized']:.2f} dB "
          f"(rounding to the codebook: {r['error_share']:.2%} of the latent's variance)")
    print("the same panels degraded for reference: " + ", ".join(
        f"{n} {v['canny_f1']:.3f} at {v['panel_psnr_db']:.1f} dB" for n, v in result["references"].items()))
    print(f"lower-panel codes kept when the upper panel changes: {np.mean(kept):.1%}")
    if "codes_same_as" in result:
        print(f"codes the same as {Path(args.codes_vs).name}'s at the same place: "
              f"{result['codes_same_as']['fraction']:.1%}")
    if "canny_f1_paired" in result:
        c = result["canny_f1_paired"]
        print(f"canny F1 from {c['before']} ({c['before_f1']:.3f}), paired by scene: {c['difference']:+.4f} "
              f"± {c['se']:.4f} ({c['higher']} scenes higher, {c['lower']} lower)")
    save_result(result, args.out)


if __name__ == "__main__":
    main()
