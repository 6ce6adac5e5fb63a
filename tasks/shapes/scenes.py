"""The synthetic shapes source: coloured shapes on textured backgrounds, with the truth attached.

    python -m tasks.shapes.scenes 7 128 128 /tmp/scene.png   # writes the image and its depth map, prints the caption

A scene is 1-3 large shapes (circle, square, triangle, star, hexagon, diamond) in clearly distinct
named colours, each in a cell of a 3x3 grid and at its own depth z, on a muted textured background
(plain, striped, checkered, dotted, gradient, speckled). Everything is drawn in coordinates relative
to the image, so one seed gives the same scene at any size. Rich enough that a small model learns
colour, shape, position, count and occlusion; simple enough for a tiny model at 64-128 px.

Deterministic from the seed alone: every draw comes from numpy's Generator(seed), never a global RNG.
Also here: edit pairs (recolour, move, remove, add, resize, with an instruction) and subject pairs
(the object alone, then inside a new scene), for the editing and subject-driven tasks.
"""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field

import cv2
import numpy as np

# Saturated, far apart in hue: a colour name is never ambiguous, even at 64 px after a VQ round trip.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 30),
    "green": (40, 170, 70),
    "cyan": (30, 200, 215),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (245, 120, 190),
}
# Muted backgrounds, so every shape colour stands out against every background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (140, 140, 140),
    "beige": (205, 190, 165),
    "slate": (75, 85, 100),
    "sage": (150, 165, 145),
    "charcoal": (50, 50, 55),
}
TEXTURES: dict[str, str] = {  # texture -> the word the caption uses
    "plain": "plain",
    "stripes": "striped",
    "checks": "checkered",
    "dots": "dotted",
    "gradient": "shaded",
    "noise": "speckled",
}
KINDS = ("circle", "square", "triangle", "star", "hexagon", "diamond")
SIZES = {"small": (0.12, 0.15), "large": (0.19, 0.23)}  # radius over the image's shorter side
GRID = (0.22, 0.5, 0.78)  # cell centres, relative
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
EDIT_OPS = ("recolour", "move", "remove", "add", "resize")
SUPERSAMPLE = 4  # coverage anti-aliasing: edges render alike at every size
BG_DEPTH = (1.0, 0.85)  # the background is a plane tilted towards the viewer: far at top, nearer at bottom
Z_RANGE = (0.25, 0.7)  # shape depths, all nearer than the background


@dataclass
class Scene:
    """A rendered scene and its truth. depth: float32 distance in [0, 1] (1 = far); depth_vis: uint8
    with near bright (as depth estimators draw it); labels: 0 background, i+1 where shape i is visible."""

    seed: int
    width: int
    height: int
    image: np.ndarray
    depth: np.ndarray
    depth_vis: np.ndarray
    labels: np.ndarray
    caption: str
    shapes: list[dict]
    background: dict
    spec: dict = field(repr=False)


@dataclass
class EditPair:
    source: Scene
    target: Scene
    op: str
    instruction: str


@dataclass
class SubjectPair:
    subject: Scene  # the object alone on a plain background
    scene: Scene  # the same object (kind and colour) inside a new scene
    description: str  # "a red star"


# ---------------------------------------------------------------- scene specs (relative, size-free)


def position_phrase(row: int, col: int) -> str:
    """Where a shape is, as the caption says it: 'at the top left', 'in the center', 'on the right'."""
    if row == 1 and col == 1:
        return "in the center"
    if row == 1:
        return f"on the {COLS[col]}"
    if col == 1:
        return f"at the {ROWS[row]}"
    return f"at the {ROWS[row]} {COLS[col]}"


def _target_phrase(row: int, col: int) -> str:
    return "to " + position_phrase(row, col).split(" ", 1)[1]  # 'to the top left', 'to the center'


def describe(shape: dict, with_size: bool = True) -> str:
    words = ([shape["size_word"]] if with_size else []) + [shape["colour"], shape["kind"]]
    return "a " + " ".join(words)


def _free_cells(shapes: list[dict], radius: float, ignore: int | None = None) -> list[tuple[int, int]]:
    """Cells where a shape of this radius keeps clear of the others (a little overlap is allowed)."""
    free = []
    for row in range(3):
        for col in range(3):
            ok = True
            for j, s in enumerate(shapes):
                if j == ignore:
                    continue
                d = np.hypot(GRID[col] - s["cx"], GRID[row] - s["cy"])
                if (s["row"], s["col"]) == (row, col) or d < 0.85 * (radius + s["r"]):
                    ok = False
            if ok:
                free.append((row, col))
    return free


def _new_shape(rng: np.random.Generator, shapes: list[dict], colours: list[str] | None = None,
               kinds: tuple[str, ...] = KINDS, size_word: str | None = None) -> dict | None:
    used = {s["colour"] for s in shapes}
    colour_pool = [c for c in (colours or list(PALETTE)) if c not in used]
    size_word = size_word or str(rng.choice(list(SIZES)))
    r = float(rng.uniform(*SIZES[size_word]))
    cells = _free_cells(shapes, r)
    # Draw every value before deciding, so the stream of draws does not depend on the outcome.
    colour = str(rng.choice(colour_pool)) if colour_pool else None
    kind = str(rng.choice(list(kinds)))
    cell_i = int(rng.integers(0, 9))
    jitter = rng.uniform(-0.03, 0.03, size=2)
    z = float(rng.uniform(*Z_RANGE))
    if colour is None or not cells:
        return None
    row, col = cells[cell_i % len(cells)]
    return {
        "kind": kind, "colour": colour, "size_word": size_word, "r": r, "row": row, "col": col,
        "cx": GRID[col] + float(jitter[0]), "cy": GRID[row] + float(jitter[1]), "z": z,
    }


def sample_background(rng: np.random.Generator, colour: str | None = None, texture: str | None = None) -> dict:
    bg = {
        "colour": colour or str(rng.choice(list(BACKGROUNDS))),
        "texture": texture or str(rng.choice(list(TEXTURES))),
        "period": float(rng.uniform(0.08, 0.16)),
        "angle": float(rng.choice([0.0, 45.0, 90.0, 135.0])),
        "contrast": float(rng.uniform(12, 22)),
        "noise": rng.uniform(-1, 1, size=(12, 12)).astype(np.float32).tolist(),
    }
    return bg


def sample_spec(seed: int, count: int | None = None, min_count: int = 1, max_count: int = 3,
                background: dict | None = None, rng: np.random.Generator | None = None) -> dict:
    """A scene as relative numbers only: background + shapes, no pixels yet."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    n = int(count) if count is not None else int(rng.integers(min_count, max_count + 1))
    if not 0 <= n <= 3:
        raise ValueError(f"shapes scene seed {seed}: count {n} is outside 0..3")
    bg = background or sample_background(rng)
    shapes: list[dict] = []
    while len(shapes) < n:
        s = _new_shape(rng, shapes)
        if s is None:  # the grid is full: fewer shapes than asked beats overlapping ones
            break
        shapes.append(s)
    _separate_depths(shapes)
    return {"seed": int(seed), "background": bg, "shapes": shapes}


def _separate_depths(shapes: list[dict]) -> None:
    """Keep z values at least 0.08 apart so the depth ordering is unambiguous in an 8-bit map."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i]["z"])
    for a, b in zip(order, order[1:]):
        if shapes[b]["z"] - shapes[a]["z"] < 0.08:
            shapes[b]["z"] = min(shapes[a]["z"] + 0.08, 0.8)


def caption_of(spec: dict) -> str:
    bg = spec["background"]
    where = f"on a {TEXTURES[bg['texture']]} {bg['colour']} background"
    shapes = sorted(spec["shapes"], key=lambda s: (s["row"], s["col"]))
    if not shapes:
        return f"an empty {TEXTURES[bg['texture']]} {bg['colour']} background"
    parts = [f"{describe(s)} {position_phrase(s['row'], s['col'])}" for s in shapes]
    if len(parts) == 1:
        return f"{parts[0]} {where}"
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{COUNT_WORDS[len(parts)]} shapes {where}: {listed}"


# ---------------------------------------------------------------- rendering


def _outline(kind: str) -> np.ndarray:
    """Polygon of a shape of circumradius ~1 centred at the origin, y pointing down; [N, 2]."""
    def ring(n: int, start: float, radius: float = 1.0) -> np.ndarray:
        a = start + np.arange(n) * 2 * np.pi / n
        return np.stack([np.cos(a), np.sin(a)], 1) * radius

    if kind == "circle":
        return ring(96, 0.0)
    if kind == "square":
        return ring(4, np.pi / 4, 1.15)
    if kind == "triangle":
        return ring(3, -np.pi / 2, 1.3) + [0.0, 0.2]  # lowered so it sits centred by area
    if kind == "star":
        outer, inner = ring(5, -np.pi / 2, 1.3), ring(5, -np.pi / 2 + np.pi / 5, 0.55)
        return np.stack([outer, inner], 1).reshape(-1, 2)
    if kind == "hexagon":
        return ring(6, 0.0, 1.05)
    if kind == "diamond":
        return ring(4, -np.pi / 2) * [0.8, 1.25]
    raise ValueError(f"unknown shape kind {kind!r}: expected one of {KINDS}")


def _coverage(poly_px: np.ndarray, width: int, height: int) -> np.ndarray:
    """Fraction of each pixel inside the polygon, by supersampling."""
    s = SUPERSAMPLE
    mask = np.zeros((height * s, width * s), np.uint8)
    pts = np.round(poly_px * s * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_8, shift=4)
    return cv2.resize(mask, (width, height), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _background(bg: dict, width: int, height: int) -> np.ndarray:
    base = np.array(BACKGROUNDS[bg["colour"]], np.float32)
    side = min(width, height)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    x, y = (x + 0.5) / side, (y + 0.5) / side
    tex, amp = bg["texture"], bg["contrast"]
    if tex == "plain":
        t = np.zeros_like(x)
    elif tex == "stripes":
        a = np.deg2rad(bg["angle"])
        t = np.tanh(3 * np.sin(2 * np.pi * (x * np.cos(a) + y * np.sin(a)) / bg["period"]))
    elif tex == "checks":
        p = bg["period"] * 1.5
        t = np.where((np.floor(x / p) + np.floor(y / p)) % 2 == 0, 1.0, -1.0).astype(np.float32)
    elif tex == "dots":
        p = bg["period"]
        d = np.hypot((x / p) % 1 - 0.5, (y / p) % 1 - 0.5)
        t = np.clip((0.3 - d) * 12, -1, 1)
    elif tex == "gradient":
        a = np.deg2rad(bg["angle"])
        u = (x * width / side) * np.cos(a) + (y * height / side) * np.sin(a)
        t = 2 * (u - u.min()) / max(float(np.ptp(u)), 1e-6) - 1
        amp = amp * 1.6
    elif tex == "noise":
        grid = np.asarray(bg["noise"], np.float32)
        t = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    else:
        raise ValueError(f"unknown background texture {tex!r}: expected one of {list(TEXTURES)}")
    return base[None, None, :] + amp * t[..., None]


def render_spec(spec: dict, width: int, height: int) -> Scene:
    if width < 8 or height < 8:
        raise ValueError(f"shapes scene seed {spec['seed']}: size {width}x{height} is too small (min 8x8)")
    image = _background(spec["background"], width, height)
    depth = np.linspace(BG_DEPTH[0], BG_DEPTH[1], height, dtype=np.float32)[:, None].repeat(width, 1)
    labels = np.zeros((height, width), np.uint8)
    side = min(width, height)
    shapes_out: list[dict] = [{} for _ in spec["shapes"]]
    # Painter's order: far shapes first, so nearer ones occlude them (and the depth map agrees).
    for i in sorted(range(len(spec["shapes"])), key=lambda i: -spec["shapes"][i]["z"]):
        s = spec["shapes"][i]
        cx, cy, rad = s["cx"] * width, s["cy"] * height, s["r"] * side
        poly = _outline(s["kind"]) * rad + [cx, cy]
        cov = _coverage(poly, width, height)
        rgb = np.array(PALETTE[s["colour"]], np.float32)
        image = image * (1 - cov[..., None]) + rgb * cov[..., None]
        inside = cov >= 0.5
        depth[inside] = s["z"]
        labels[inside] = i + 1
        x0, y0 = np.floor(poly.min(0)).astype(int)
        x1, y1 = np.ceil(poly.max(0)).astype(int)
        shapes_out[i] = {
            "kind": s["kind"], "colour": s["colour"], "rgb": PALETTE[s["colour"]],
            "centre": (float(cx), float(cy)), "size": float(rad), "size_word": s["size_word"],
            "z": float(s["z"]), "position": position_phrase(s["row"], s["col"]),
            "cell": (s["row"], s["col"]),
            "bbox": (max(int(x0), 0), max(int(y0), 0), min(int(x1), width), min(int(y1), height)),
        }
    image_u8 = np.clip(np.round(image), 0, 255).astype(np.uint8)
    depth_vis = np.round(255 * (1 - depth)).astype(np.uint8)
    return Scene(
        seed=int(spec["seed"]), width=width, height=height, image=image_u8, depth=depth.astype(np.float32),
        depth_vis=depth_vis, labels=labels, caption=caption_of(spec), shapes=shapes_out,
        background={k: spec["background"][k] for k in ("colour", "texture")}, spec=spec,
    )


def render_scene(seed: int, width: int, height: int, **opts) -> Scene:
    """One scene from its seed at any size. opts: count, min_count, max_count (1..3 by default)."""
    return render_spec(sample_spec(seed, **opts), width, height)


# ---------------------------------------------------------------- editing and subject pairs


def _edit(spec: dict, op: str, rng: np.random.Generator) -> tuple[dict, str]:
    target = copy.deepcopy(spec)
    shapes = target["shapes"]
    i = int(rng.integers(0, len(shapes))) if shapes else 0
    if op == "add":
        s = _new_shape(rng, shapes)
        if s is None:
            raise ValueError("no room to add a shape")
        shapes.append(s)
        _separate_depths(shapes)
        return target, f"add {describe(s)} {position_phrase(s['row'], s['col'])}"
    s = shapes[i]
    name = describe(s, with_size=False)[2:]  # 'red circle': colours are unique within a scene
    if op == "recolour":
        pool = [c for c in PALETTE if c not in {x["colour"] for x in shapes}]
        new = str(rng.choice(pool))
        s["colour"] = new
        verb = str(rng.choice(["make", "turn"]))
        return target, f"{verb} the {name} {new}"
    if op == "move":
        cells = _free_cells(shapes, s["r"], ignore=i)
        cells = [c for c in cells if c != (s["row"], s["col"])]
        if not cells:
            raise ValueError("no free cell to move to")
        s["row"], s["col"] = cells[int(rng.integers(0, len(cells)))]
        s["cx"], s["cy"] = GRID[s["col"]], GRID[s["row"]]
        return target, f"move the {name} {_target_phrase(s['row'], s['col'])}"
    if op == "remove":
        del shapes[i]
        return target, f"remove the {name}"
    if op == "resize":
        bigger = s["size_word"] == "small"
        s["size_word"] = "large" if bigger else "small"
        lo, hi = SIZES[s["size_word"]]
        s["r"] = float(lo + (hi - lo) / 2)
        return target, f"make the {name} {'bigger' if bigger else 'smaller'}"
    raise ValueError(f"unknown edit op {op!r}: expected one of {EDIT_OPS}")


def edit_pair(seed: int, width: int, height: int, op: str | None = None) -> EditPair:
    """A source scene, the scene after one edit, and the instruction that says what changed."""
    rng = np.random.default_rng(seed)
    op = op or str(rng.choice(EDIT_OPS))
    if op not in EDIT_OPS:
        raise ValueError(f"unknown edit op {op!r}: expected one of {EDIT_OPS}")
    # remove needs a shape to spare, add needs room; the others need at least one shape.
    lo, hi = {"remove": (2, 3), "add": (1, 2)}.get(op, (1, 3))
    for _ in range(20):  # a crowded layout can leave no room for move/add: draw another layout
        spec = sample_spec(seed, min_count=lo, max_count=hi, rng=rng)
        try:
            target, instruction = _edit(spec, op, rng)
            break
        except ValueError:
            continue
    else:
        raise ValueError(f"edit pair seed {seed}: found no layout that allows {op!r}")
    return EditPair(render_spec(spec, width, height), render_spec(target, width, height), op, instruction)


def subject_pair(seed: int, width: int, height: int) -> SubjectPair:
    """The subject alone, large and centred on a plain background; then the same kind and colour
    in a new scene with other shapes, another background and its own position and size."""
    rng = np.random.default_rng(seed)
    scene_spec = sample_spec(seed, min_count=1, max_count=3, rng=rng)
    subject = scene_spec["shapes"][int(rng.integers(0, len(scene_spec["shapes"])))]
    alone = {
        "seed": int(seed),
        "background": sample_background(rng, colour="grey", texture="plain"),
        "shapes": [dict(subject, row=1, col=1, cx=0.5, cy=0.5, r=0.3, size_word="large", z=0.4)],
    }
    return SubjectPair(render_spec(alone, width, height), render_spec(scene_spec, width, height),
                       describe(subject, with_size=False))


def main(argv: list[str]) -> None:
    seed, w, h, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    scene = render_scene(seed, w, h)
    cv2.imwrite(out, cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
    cv2.imwrite(out.replace(".png", "_depth.png"), scene.depth_vis)
    print(scene.caption)


if __name__ == "__main__":
    main(sys.argv[1:] or ["0", "128", "128", "/tmp/scene.png"])
