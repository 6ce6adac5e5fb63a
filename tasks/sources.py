"""Sources of build_panels: readers that list input rows with stable ids, cheaply, in a fixed order.

    python -m tasks.sources '{"kind": "folder", "path": "photos/"}'     # prints the row count and the first rows

A source is given by a dict in the config (panels.source):
- {kind: shapes, count, seed, aspect: square|mixed}: the synthetic shapes (tasks/shapes.py);
- {kind: folder, path, captions: FILE?}: images with captions in captions.jsonl / .csv / .parquet
  beside them (columns file and caption), or in a <name>.txt sidecar per image;
- {kind: edits, path}: editing triplets in jsonl or parquet: source, target, instruction, caption;
- {kind: subjects, path}: subject pairs in jsonl or parquet: subject_image, image, subject, caption;
- {kind: generated, uri}: a generated/ dataset written by the generation flow (the synthetic loop).

Listing touches no pixels: a row is a small dict (id, paths, caption text, or an `error` when the
listing itself found the row unusable). Workers open the same source and decode their rows.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
CAPTION_FILES = ("captions.jsonl", "captions.csv", "captions.parquet")
FILE_KEYS = ("file", "image", "path", "file_name")
CAPTION_KEYS = ("caption", "text", "prompt")


class SourceError(ValueError):
    """A source that cannot be listed at all (missing folder, unreadable table): names it and what to do."""


def _read_table(path: Path) -> list[dict | str]:
    """Rows of a jsonl, csv or parquet file; a jsonl line that is not a JSON object stays a str (its error)."""
    if not path.is_file():
        raise SourceError(f"{path}: table not found; set panels.source.path to a jsonl, csv or parquet file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - any parquet failure means the same thing to the user
            raise SourceError(f"{path}: not a readable parquet file ({e})") from None
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            return list(csv.DictReader(f))
    if suffix in (".jsonl", ".json"):
        rows: list[dict | str] = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    rows.append(f"{path.name} line {n}: not valid JSON ({e.msg})")
                    continue
                rows.append(row if isinstance(row, dict) else f"{path.name} line {n}: expected a JSON object")
        return rows
    raise SourceError(f"{path}: unknown table format {suffix!r}; use .jsonl, .csv or .parquet")


def _get(row: dict, keys: tuple[str, ...]):
    for k in keys:
        if k in row:
            return row[k]
    return None


class ShapesSource:
    """The synthetic shapes: row i is scene seed SeedSequence([seed, i]); renders in the worker."""

    kind = "shapes"

    def __init__(self, count: int = 64, seed: int = 0, aspect: str = "square", **extra):
        if extra:
            raise SourceError(f"shapes source: unknown options {sorted(extra)}; expected count, seed, aspect")
        if aspect not in ("square", "mixed"):
            raise SourceError(f"shapes source: aspect {aspect!r}: expected 'square' or 'mixed'")
        self.count, self.seed, self.aspect = int(count), int(seed), aspect
        self.name = f"shapes(seed={self.seed})"

    def __len__(self) -> int:
        return self.count

    def scene_seed(self, index: int) -> int:
        return int(np.random.SeedSequence([self.seed, index]).generate_state(1, np.uint64)[0] >> 1)

    def rows(self, start: int, end: int) -> list[dict]:
        return [{"id": f"shapes-{self.seed}-{i:07d}", "index": i, "scene_seed": self.scene_seed(i)}
                for i in range(start, min(end, self.count))]

    def inputs(self) -> list[dict]:
        return []


class _ListSource:
    """A source whose rows are listed up front in self._rows (folders, edit/subject tables)."""

    _rows: list[dict]

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, start: int, end: int) -> list[dict]:
        return [dict(r, index=i) for i, r in enumerate(self._rows[start:end], start)]

    def inputs(self) -> list[dict]:
        return []


class FolderSource(_ListSource):
    """Images in a folder with captions. Rows: every captions-table entry in order, then every
    image file the table does not name (so an image without a caption becomes a reject, not a gap)."""

    kind = "folder"

    def __init__(self, path: str, captions: str | None = None, recursive: bool = False, **extra):
        if extra:
            raise SourceError(f"folder source: unknown options {sorted(extra)}; expected path, captions, recursive")
        self.root = Path(path)
        if not self.root.is_dir():
            raise SourceError(f"folder source {path!r}: not a folder; set panels.source.path")
        self.name = f"folder:{self.root}"
        table = Path(captions) if captions else next((self.root / c for c in CAPTION_FILES if (self.root / c).is_file()), None)
        if table is not None and not table.is_absolute() and not table.exists():
            table = self.root / table
        self._rows: list[dict] = []
        named: set[str] = set()
        seen: dict[str, int] = {}
        if table is not None:
            for n, row in enumerate(_read_table(table)):
                if isinstance(row, str):
                    self._rows.append({"id": f"{table.name}#{n}", "error": ("bad_row", row)})
                    continue
                rel = _get(row, FILE_KEYS)
                if not rel:
                    self._rows.append({"id": f"{table.name}#{n}", "error": (
                        "bad_row", f"{table.name} row {n}: no file column (one of {FILE_KEYS})")})
                    continue
                rel = str(rel)
                named.add(os.path.normpath(rel))
                k = seen[rel] = seen.get(rel, 0) + 1
                self._rows.append({"id": rel if k == 1 else f"{rel}#{k}", "path": str(self.root / rel),
                                   "caption": _get(row, CAPTION_KEYS), "ref": rel})
        files = self.root.rglob("*") if recursive else self.root.iterdir()
        for p in sorted(files):
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            rel = os.path.normpath(os.path.relpath(p, self.root))
            if rel in named:
                continue
            side = p.with_suffix(".txt")
            caption = side.read_text(encoding="utf-8", errors="replace") if side.is_file() else None
            self._rows.append({"id": rel, "path": str(p), "caption": caption, "ref": rel})


class PairsSource(_ListSource):
    """Editing triplets (edits) or subject pairs (subjects) from a jsonl or parquet table."""

    COLUMNS = {
        "edits": {"upper": "source", "lower": "target", "text": "instruction"},
        "subjects": {"upper": "subject_image", "lower": "image", "text": "subject"},
    }

    def __init__(self, kind: str, path: str, **extra):
        if extra:
            raise SourceError(f"{kind} source: unknown options {sorted(extra)}; expected path")
        self.kind = kind
        self.table = Path(path)
        self.root = self.table.parent
        self.name = f"{kind}:{self.table}"
        cols = self.COLUMNS[kind]
        self._rows = []
        for n, row in enumerate(_read_table(self.table)):
            rid = f"{self.table.name}#{n}"
            if isinstance(row, str):
                self._rows.append({"id": rid, "error": ("bad_row", row)})
                continue
            missing = [c for c in (cols["upper"], cols["lower"]) if not row.get(c)]
            if missing:
                self._rows.append({"id": rid, "error": ("bad_row", f"{rid}: missing {missing}; each row needs "
                                                        f"{list(cols.values())} and caption")})
                continue
            self._rows.append({
                "id": str(row.get("id") or rid),
                "upper_path": str(self.root / str(row[cols["upper"]])),
                "lower_path": str(self.root / str(row[cols["lower"]])),
                "text": row.get(cols["text"]), "caption": _get(row, CAPTION_KEYS),
                "ref": f"{rid} ({row[cols['upper']]} -> {row[cols['lower']]})",
            })


class GeneratedSource:
    """Rows of a generated/ dataset (same panel schema): the synthetic-data loop."""

    kind = "generated"

    def __init__(self, uri: str, **extra):
        if extra:
            raise SourceError(f"generated source: unknown options {sorted(extra)}; expected uri")
        from storage import open_dataset

        self.uri = uri
        self.dataset = open_dataset(uri)
        self.name = f"generated:{uri}"

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, start: int, end: int) -> list[dict]:
        end = min(end, len(self.dataset))
        if start >= end:
            return []
        table = self.dataset.take(list(range(start, end)))
        return [dict(r, index=i, ref=f"{self.uri} row {i} ({r['id']})") for i, r in enumerate(table.to_pylist(), start)]

    def inputs(self) -> list[dict]:
        return [self.dataset.manifest]


def open_source(spec: dict):
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind == "shapes":
        return ShapesSource(**spec)
    if kind == "folder":
        return FolderSource(**spec)
    if kind in ("edits", "subjects"):
        return PairsSource(kind, **spec)
    if kind == "generated":
        return GeneratedSource(**spec)
    raise SourceError(f"panels.source.kind {kind!r}: expected shapes, folder, edits, subjects or generated")


if __name__ == "__main__":
    src = open_source(json.loads(sys.argv[1]))
    print(f"{src.name}: {len(src)} rows")
    for r in src.rows(0, 5):
        print({k: v for k, v in r.items() if k not in ("upper", "lower")})
