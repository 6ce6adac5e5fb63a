"""Sources of build_panels: readers that list input rows with stable ids, cheaply, in a fixed order.

    python -m tasks.panels.sources '{"kind": "folder", "path": "photos/"}'     # prints the row count and the first rows

A source is given by a dict in the config (panels.source):
- {kind: shapes, count, seed, aspect: square|mixed}: the synthetic shapes (tasks/shapes/scenes.py);
- {kind: folder, path, captions: FILE?}: images with captions in captions.jsonl / .csv / .parquet
  beside them (columns file and caption), or in a <name>.txt sidecar per image;
- {kind: edits, path}: editing triplets in jsonl or parquet: source, target, instruction, caption;
- {kind: subjects, path}: subject pairs in jsonl or parquet: subject_image, image, subject, caption;
- {kind: generated, uri}: a generated/ dataset written by the generation flow (the synthetic loop);
- {kind: webdataset, path, caption_field?}: tar shards as img2dataset writes them (key.jpg + key.txt
  or key.json), a folder of .tar files, one .tar, or a brace range "s3://b/p/{00000..00099}.tar";
- {kind: parquet, path, image_column?, caption_column?, id_column?}: Parquet files with the image
  bytes in a column (the Hugging Face layout: a struct {bytes, path}, or plain binary) and the
  caption in another; a folder, one file or a brace range, local or on an object store.

The tar and Parquet sources read with pyarrow per work unit, not through Ray Data's readers
(docs/data.md says why): the listing gives every row a fixed index (shard order, then member or row
order), so units, resume and the rows-in = rows-out + rejects accounting are the folder source's.

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


# ---------------------------------------------------------------- shards: webdataset tars and Parquet

IMAGE_MEMBER_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 256 << 20  # a member this large is not a picture to decode in memory: a reject
_BRACE = __import__("re").compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(path: str) -> list[str]:
    """'s3://b/{00000..00002}.tar' -> the three names, zero-padded as written (webdataset's notation)."""
    m = _BRACE.search(path)
    if not m:
        return [path]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise SourceError(f"{path}: brace range {{{lo}..{hi}}} runs backwards")
    width = len(lo) if lo.startswith("0") else 0
    return [name for i in range(int(lo), int(hi) + 1)
            for name in expand_braces(path[:m.start()] + str(i).zfill(width) + path[m.end():])]


def list_shards(kind: str, path: str, suffix: str) -> list[tuple[str, object, str]]:
    """(uri to show, filesystem, path in it) of every shard: a folder's *<suffix> files in name order,
    one file, or a brace range (members of a range that do not exist are listed: their rows are rejects)."""
    from storage.uri import resolve

    if not path:
        raise SourceError(f"{kind} source: needs path (a folder, a {suffix} file, or a brace range of them)")
    names = expand_braces(str(path))
    if len(names) == 1:
        loc = resolve(names[0])
        info = loc.fs.get_file_info(loc.path)
        if info.type.name == "Directory":
            import pyarrow.fs as pafs

            found = sorted(i.path for i in loc.fs.get_file_info(pafs.FileSelector(loc.path))
                           if i.type.name == "File" and i.path.endswith(suffix))
            if not found:
                raise SourceError(f"{kind} source {path!r}: a folder without {suffix} files")
            return [(loc.uri.rstrip("/") + "/" + f.rsplit("/", 1)[-1], loc.fs, f) for f in found]
        if info.type.name == "NotFound":
            raise SourceError(f"{kind} source {path!r}: no such file or folder; set panels.source.path")
    out = []
    for name in names:
        loc = resolve(name)
        out.append((loc.uri, loc.fs, loc.path))
    return out


def split_member(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): webdataset's key is the name up to the first dot of
    its last part, the extension the rest (lower-cased)."""
    folder, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext.lower()


def _shard_name(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


class _ShardSource:
    """Rows listed from shards up front (cheap metadata only: tar headers, Parquet footers), read
    per unit. A shard that is missing or unreadable becomes one reject row, never a silent gap."""

    _rows: list[dict]

    def __len__(self) -> int:
        return len(self._rows)

    def inputs(self) -> list[dict]:
        return []

    def rows(self, start: int, end: int) -> list[dict]:
        items = [dict(r, index=i) for i, r in enumerate(self._rows[start:end], start)]
        by_shard: dict[int, list[dict]] = {}
        for item in items:
            if not item.get("error"):
                by_shard.setdefault(item["shard"], []).append(item)
        for k, group in by_shard.items():
            uri, fs, path = self._shards[k]
            try:
                with fs.open_input_file(path) as f:
                    self._read(f, uri, group)
            except (OSError, ValueError) as e:  # the shard vanished or broke since the listing
                for item in group:
                    item["error"] = ("unreadable_shard", f"{uri}: cannot be read now ({e})")
        for item in items:
            item.pop("shard", None)
        return items

    def _broken(self, k: int, reason: str, detail: str) -> None:
        self._rows.append({"id": f"{_shard_name(self._shards[k][0])}#{reason}", "ref": self._shards[k][0],
                           "error": (reason, detail)})


class WebDatasetSource(_ShardSource):
    """img2dataset's output: tar shards of samples key.jpg (.png/.webp) + key.txt and/or key.json
    (its caption field). A sample without an image or a caption, a broken image, a truncated shard
    and a missing shard are rejects with their reason."""

    kind = "webdataset"

    def __init__(self, path: str, caption_field: str = "caption", **extra):
        if extra:
            raise SourceError(f"webdataset source: unknown options {sorted(extra)}; expected path, caption_field")
        import tarfile

        self.caption_field = caption_field
        self._shards = list_shards("webdataset", path, ".tar")
        self.name = f"webdataset:{path}"
        self._rows = []
        for k, (uri, fs, p) in enumerate(self._shards):
            samples: dict[str, dict] = {}
            error = None
            try:
                with fs.open_input_file(p) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    try:
                        for m in tar:
                            if m.isfile():
                                key, ext = split_member(m.name)
                                samples.setdefault(key, {})[ext] = (m.offset_data, m.size)
                    except (tarfile.ReadError, EOFError, OSError) as e:
                        error = f"{uri}: the tar ends early or is corrupt after {len(samples)} samples ({e}); re-copy it"
            except FileNotFoundError:
                self._broken(k, "missing_shard", f"{uri}: no such shard; fix the path or brace range, or restore it")
                continue
            except (tarfile.ReadError, OSError) as e:
                self._broken(k, "unreadable_shard", f"{uri}: not a readable tar ({e}); re-copy it")
                continue
            shard = _shard_name(uri)
            for key, members in samples.items():
                row = {"id": f"{shard}/{key}", "ref": f"{uri}:{key}", "shard": k, "members": members}
                image = [e for e in IMAGE_MEMBER_EXTS if e in members]
                large = [f"{key}.{e} ({size:,} bytes)" for e, (_, size) in members.items() if size > MAX_MEMBER_BYTES]
                if not image:
                    row["error"] = ("missing_image", (f"{uri}:{key}: no image member "
                                                      f"(.{', .'.join(IMAGE_MEMBER_EXTS)}); found {sorted(members)}"))
                elif large:
                    row["error"] = ("too_large", f"{uri}: {', '.join(large)} over {MAX_MEMBER_BYTES >> 20} MiB")
                self._rows.append(row)
            if error:
                self._broken(k, "truncated_shard", error)

    def _read(self, f, uri: str, items: list[dict]) -> None:
        for item in items:
            members, ref = item.pop("members"), item["ref"]
            try:
                ext = next(e for e in IMAGE_MEMBER_EXTS if e in members)
                item["image"] = _member(f, members, ref, ext)
                if "txt" in members:
                    item["caption"] = _member(f, members, ref, "txt").decode("utf-8")
                elif "json" in members:
                    meta = json.loads(_member(f, members, ref, "json"))
                    item["caption"] = meta.get(self.caption_field) if isinstance(meta, dict) else None
            except EOFError as e:
                item["error"] = ("truncated_member", str(e))
            except UnicodeDecodeError:
                item["error"] = ("bad_caption", f"{ref}.txt: not UTF-8 text")
            except json.JSONDecodeError as e:
                item["error"] = ("bad_caption", f"{ref}.json: not valid JSON ({e.msg})")


def _member(f, members: dict, ref: str, ext: str) -> bytes:
    """The bytes of member <key>.<ext> of an open tar, by its offset; EOFError when cut short."""
    offset, size = members[ext]
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise EOFError(f"{ref}.{ext}: {len(data)} of {size} bytes (the shard is cut short)")
    return data


class ParquetSource(_ShardSource):
    """Parquet files with the image bytes in a column (Hugging Face datasets' Image feature: a struct
    {bytes, path}; or plain binary) and the caption in another. Listing reads only the footers."""

    kind = "parquet"
    IMAGE_COLUMNS = ("image", "jpg", "png", "img")

    def __init__(self, path: str, image_column: str | None = None, caption_column: str | None = None,
                 id_column: str | None = None, **extra):
        if extra:
            raise SourceError(f"parquet source: unknown options {sorted(extra)}; expected path, image_column, "
                              "caption_column, id_column")
        import pyarrow.parquet as pq

        self._shards = list_shards("parquet", path, ".parquet")
        self.name = f"parquet:{path}"
        self.columns: tuple[str, str, str | None] | None = None
        self._rows = []
        for k, (uri, fs, p) in enumerate(self._shards):
            try:
                with fs.open_input_file(p) as f:
                    meta = pq.ParquetFile(f).metadata
                    names = meta.schema.to_arrow_schema().names
            except FileNotFoundError:
                self._broken(k, "missing_shard", f"{uri}: no such file; fix the path or brace range, or restore it")
                continue
            except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
                self._broken(k, "unreadable_shard", f"{uri}: not a readable Parquet file ({e}); re-copy it")
                continue
            image = image_column or next((c for c in self.IMAGE_COLUMNS if c in names), None)
            caption = caption_column or next((c for c in CAPTION_KEYS if c in names), None)
            missing = []
            for what, col in (("image_column", image), ("caption_column", caption), ("id_column", id_column)):
                if (col is None and what != "id_column") or (col is not None and col not in names):
                    missing.append(f"{what}={col!r}")
            if missing:
                raise SourceError(f"parquet source {uri}: {', '.join(missing)} not among its columns {names}; "
                                  "set panels.source.image_column / caption_column / id_column")
            self.columns = (image, caption, id_column)
            shard = _shard_name(uri)
            self._rows += [{"id": f"{shard}#{i}", "ref": f"{uri} row {i}", "shard": k, "row": i,
                            "columns": (image, caption, id_column)} for i in range(meta.num_rows)]

    def _read(self, f, uri: str, items: list[dict]) -> None:
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        image, caption, id_col = items[0]["columns"]
        lo, hi = items[0]["row"], items[-1]["row"] + 1
        # Only the row groups that hold [lo, hi): a unit reads its own rows, not the whole file.
        groups, first, at = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at < hi and at + n > lo:
                groups.append(g)
                first = at if first is None else first
            at += n
        cols = [c for c in (image, caption, id_col) if c]
        table = pf.read_row_groups(groups, columns=cols).slice(lo - first, hi - lo)
        values = {c: table.column(c).to_pylist() for c in cols}
        for j, item in enumerate(items):
            item.pop("columns")
            row = item.pop("row")
            value = values[image][row - lo]
            if isinstance(value, dict):  # the Hugging Face Image layout
                if value.get("bytes") is None and value.get("path"):
                    item["error"] = ("missing_image", (f"{item['ref']}: the image is stored by path only "
                                                       f"({value['path']!r}); export the dataset with embedded "
                                                       "image bytes"))
                    continue
                value = value.get("bytes")
            if value is None:
                item["error"] = ("missing_image", f"{item['ref']}: column {image!r} is empty")
                continue
            if not isinstance(value, (bytes, bytearray)):
                item["error"] = ("missing_image", (f"{item['ref']}: column {image!r} holds "
                                                   f"{type(value).__name__}, not image bytes"))
                continue
            item["image"] = bytes(value)
            item["caption"] = values[caption][row - lo]
            if id_col and values[id_col][row - lo] is not None:
                item["id"] = str(values[id_col][row - lo])


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
    if kind == "webdataset":
        return WebDatasetSource(**spec)
    if kind == "parquet":
        return ParquetSource(**spec)
    raise SourceError(f"panels.source.kind {kind!r}: expected shapes, folder, edits, subjects, generated, "
                      "webdataset or parquet")


if __name__ == "__main__":
    src = open_source(json.loads(sys.argv[1]))
    print(f"{src.name}: {len(src)} rows")
    for r in src.rows(0, 5):
        print({k: v for k, v in r.items() if k not in ("upper", "lower")})
