"""Inputs of a bulk generation job, validated before any model is loaded (issue 7).

    python -m tasks.generate.requests --config configs/tiny.yaml     # prints the pairs and the rejects

A job's input is one of (config `generate.inputs`):
  {kind: file, path: prompts.jsonl, count: N?}  a jsonl, csv or parquet file of prompt rows, or a
      folder of <id>.txt prompt files (DPG-Bench's prompts/); `count` takes its first N rows:
      prompt (required; or `text`, `caption`), task (default: generate.task, t2i; t2i, pair,
      control:<map>, dense:<map>, edit, subject), size ("512x256") or width + height, upper (an
      image path relative to the file, or bytes in parquet), control_source (an image whose
      control map becomes the upper panel), seed, count, id (or `item_id`), instruction (edit: the
      instruction; pair: the lower panel's description), subject (subject: the object's description).
      Every other field (GenEval's tag/include/exclude, DPG-Bench's category/question) is kept in
      each pair's params["fields"], for an evaluator to read later. Consecutive rows with the same
      id and prompt (DPG-Bench's dpg_bench.csv: one row per question) are one prompt; their
      differing fields become lists.
  {kind: panels, uri: ...}          a panels dataset: re-generate the generated part of each row.
  {kind: shapes, count, seed, tasks} the synthetic shapes source (the embedded default).

Each valid row expands to `count` pairs with stable ids `<row id>#<k>` and deterministic seeds;
each bad row becomes a reject {input_ref, stage: "request", reason, detail}, among them a prompt
whose pair would not fit the decoder's context (`too_long`: counted with the config's tokenizer,
before any model loads). Nothing is skipped silently: rows in = rows expanded + rows rejected.
"""
from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from model.prompts import PromptError, render_prompt, split_task

UPPER_TASKS = ("edit", "subject")  # plus control:<map>, dense:<map>: the upper panel is given
MIN_SIDE = 64
# Fields a prompt row may use; the first alias present wins (benchmark files name them differently).
PROMPT_KEYS = ("prompt", "text", "caption")
ID_KEYS = ("id", "item_id")
USED_KEYS = {"task", "size", "width", "height", "upper", "control_source", "seed", "count", "instruction", "subject"}
MAX_PIXELS = 64_000_000  # decompression-bomb guard for upper images


class RequestError(ValueError):
    """A job input that cannot be used at all (missing file, unknown kind, no valid rows)."""


@dataclass
class PairSpec:
    """One requested pair: everything an engine actor needs, JSON-able (Ray transport)."""

    id: str  # "<row id>#<k>", stable across reruns
    row_id: str
    task: str
    caption: str  # the user text the prompt was rendered from (after rewriting)
    prompt: str  # the rendered task prompt
    width: int  # the whole (dual-panel) image
    height: int
    seed: int
    source: str  # input reference: file:row, dataset:row, shapes:id
    upper: bytes | None = None  # PNG of the given upper panel at (width, height // 2)
    params: dict = field(default_factory=dict)  # original caption, subject, instruction, ...

    def to_dict(self) -> dict:
        """JSON-able: the upper panel's bytes as base64 (work units travel as JSON)."""
        d = asdict(self)
        d["upper"] = None if self.upper is None else base64.b64encode(self.upper).decode("ascii")
        return d

    @staticmethod
    def from_dict(d: dict) -> "PairSpec":
        d = dict(d)
        d["upper"] = None if d.get("upper") is None else base64.b64decode(d["upper"])
        return PairSpec(**d)


def needs_upper(task: str) -> bool:
    return task in UPPER_TASKS or task.startswith(("control:", "dense:"))


def check_task(task: str) -> str | None:
    """None when `task` is known, else what is wrong with it."""
    try:
        split_task(task)
    except PromptError as e:
        return str(e)
    return None


def parse_size(value: Any) -> tuple[int, int]:
    """'512x256' / '512*256' / [512, 256] -> (width, height); ValueError when malformed."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    m = re.fullmatch(r"\s*(\d+)\s*[x\u00d7*]\s*(\d+)\s*", str(value))
    if not m:
        raise ValueError(f"size {value!r} is not WIDTHxHEIGHT, e.g. 512x512")
    return int(m.group(1)), int(m.group(2))


def check_size(width: int, height: int, task: str, max_side: int) -> str | None:
    """None when the size is usable for `task`, else what is wrong (REFERENCE.md: multiples of 32)."""
    if width % 32 or height % 32:
        return f"size {width}x{height} is not a multiple of 32"
    if min(width, height) < MIN_SIDE or max(width, height) > max_side:
        return f"size {width}x{height} outside {MIN_SIDE}..{max_side} px (generate.max_side)"
    return None


def derive_seed(job_seed: int, row_id: str, k: int) -> int:
    """A seed from the job seed, the row id and the copy index: stable, independent of row order."""
    h = hashlib.sha256(f"{job_seed}:{row_id}:{k}".encode()).digest()
    return int.from_bytes(h[:7], "little")


def sample_seed(pair_seed: int, j: int) -> int:
    """Seed of the j-th best-of-N sample of a pair; sample 0 uses the pair's own seed."""
    if j == 0:
        return pair_seed
    return int.from_bytes(hashlib.sha256(f"{pair_seed}:{j}".encode()).digest()[:7], "little")


def fit_panel(img: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to cover (width, height) and centre-crop, as the release crops its reference panel."""
    img = img.convert("RGB")
    scale = max(width / img.width, height / img.height)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return img.crop((left, top, left + width, top + height))


def png_bytes(arr_or_img: np.ndarray | Image.Image) -> bytes:
    img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(np.asarray(arr_or_img))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes | str | Path) -> Image.Image:
    """Open an image fully (path or bytes), refusing bombs; raises ValueError with the cause."""
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else str(data))
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
        img.load()
        return img
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot decode image: {e}") from None


def control_map(img: Image.Image, control: str, panels) -> Image.Image:
    """The control map of a photo (for `control_source` rows and the shapes source), drawn by the
    same annotators as the panels the model trained on (tasks/panels/annotators.py, thresholds from the
    panels config). Depth and pose need models: give those maps as 'upper'."""
    from tasks.panels import annotators

    rgb = np.asarray(img.convert("RGB"))
    if control == "canny":
        m = annotators.canny(rgb, panels.canny_low, panels.canny_high)
    elif control == "hed":
        m = annotators.soft_edge(rgb, panels.soft_edge_sigma)
    else:
        raise ValueError(f"control_source can make canny and hed maps here; give the {control} map as 'upper'")
    return Image.fromarray(np.repeat(m[..., None], 3, axis=2))


# ---------------------------------------------------------------------------------------------
# Reading rows


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(row index, raw dict) from jsonl, csv or parquet; a malformed jsonl line yields {'_error': ...}."""
    p = Path(path)
    if p.is_dir():  # DPG-Bench's prompts/: one <id>.txt per prompt, in name order
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".txt")
        if not files:
            raise RequestError(f"{p}: a folder without .txt prompt files; give a jsonl, csv or parquet file or a "
                               "folder of <id>.txt prompts")
        for i, f in enumerate(files):
            yield i, {"id": f.stem, "prompt": f.read_text(encoding="utf-8", errors="replace").strip()}
        return
    if not p.is_file():
        raise RequestError(f"{p}: prompts file not found; set generate.inputs.path to a jsonl, csv or parquet file")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with p.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield i, {"_error": f"not valid JSON: {e.msg} at column {e.colno}"}
                    continue
                yield i, row if isinstance(row, dict) else {"_error": f"expected a JSON object, got {type(row).__name__}"}
    elif suffix in (".csv", ".tsv"):
        with p.open(encoding="utf-8", newline="") as f:
            for i, row in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")):
                yield i, {k: v for k, v in row.items() if k is not None and v not in (None, "")}
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(p).to_pylist()):
            yield i, {k: v for k, v in row.items() if v is not None}
    else:
        raise RequestError(f"{p}: unsupported prompts file type {suffix!r}; use .jsonl, .csv or .parquet")


@dataclass
class Expanded:
    pairs: list[PairSpec]
    rejects: list[dict]
    rows: int  # input rows read

    def summary(self) -> dict:
        reasons: dict[str, int] = {}
        for r in self.rejects:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        return {"rows": self.rows, "pairs": len(self.pairs), "rejected_rows": len(self.rejects), "reject_reasons": reasons}


def no_valid_rows_message(ex: Expanded, first: int = 5) -> str:
    """What a job whose every row was rejected says: the counts per reason, then the first rejects
    with their reasons, so the user sees what to fix without opening the rejects table."""
    reasons = ", ".join(f"{k}: {v}" for k, v in ex.summary()["reject_reasons"].items()) or "no rows"
    lines = [f"generate: no valid input rows ({reasons}) among {ex.rows} rows read; the first rejects:"]
    lines += [f"  {r['input_ref']}: {r['reason']}: {r['detail']}" for r in ex.rejects[:first]]
    if len(ex.rejects) > first:
        lines.append(f"  ... and {len(ex.rejects) - first} more")
    lines.append("fix the inputs (rows without a task take generate.task) and run again")
    return "\n".join(lines)


@dataclass
class PromptContext:
    """Counts the positions a pair needs in the decoder's context, as the engine does: the prompt's
    tokens (BOS + text + turn end), the whole image span, and the SJD window."""

    encode: Callable[[str], list[int]]
    max_positions: int
    window: int
    where: str  # where max_positions comes from, for the reject's detail

    def check(self, prompt: str, width: int, height: int) -> str | None:
        from model.layout import image_span_length

        text = len(self.encode(prompt)) + 2
        need = text + image_span_length(height, width) + self.window
        if need <= self.max_positions:
            return None
        return (f"the prompt ({text} tokens) and a {width}x{height} image need {need} positions (with the "
                f"{self.window}-token SJD window); {self.where} holds {self.max_positions}: shorten the prompt or "
                "the size")


def prompt_context(cfg) -> PromptContext:
    """The config's tokenizer and the decoder's context length (its config.json, else tokenize.max_seq);
    loads no model weights."""
    from model.text_tokenizer import load_text_tokenizer

    m = cfg.models
    try:
        tok = load_text_tokenizer(m.tokenizer, m.tokenizer_path)
    except Exception as e:  # noqa: BLE001 - any tokenizer failure means the same to the user
        raise RequestError(f"models.tokenizer {m.tokenizer!r}: cannot load it to count prompt tokens ({e})") from None
    max_positions, where = cfg.tokenize.max_seq, "tokenize.max_seq"
    conf = Path(m.decoder_path) / "config.json" if m.decoder_path else None
    if conf is not None and conf.is_file():
        try:
            max_positions = int(json.loads(conf.read_text())["max_position_embeddings"])
            where = f"the decoder's context ({conf})"
        except (ValueError, KeyError, TypeError):
            pass  # check_models reports a broken decoder folder; the config's length stands in here
    return PromptContext(tok.encode, max_positions, cfg.generate.sjd_window, where)


def _reject(ref: str, reason: str, detail: str) -> dict:
    return {"input_ref": ref, "stage": "request", "reason": reason, "detail": detail}


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} {value!r} is not an integer")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{what} {value!r} is not an integer")
    try:
        return int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an integer") from None


def expand_row(
    row: dict,
    ref: str,
    *,
    gen,
    maps,
    base_dir: Path | None,
    rewrite: Callable[[str], str] | None = None,
    context: PromptContext | None = None,
) -> tuple[list[PairSpec], dict | None]:
    """Validate one raw row and expand it to its pairs, or return a reject (never raises)."""
    if "_error" in row:
        return [], _reject(ref, "malformed_row", row["_error"])
    row_id = str(_first(row, ID_KEYS) or ref)
    prompt = _first(row, PROMPT_KEYS)
    if not isinstance(prompt, str) or not prompt.strip():
        return [], _reject(ref, "empty_prompt", "column 'prompt' (or 'text', 'caption') is missing or empty; give the "
                           "caption or instruction")
    task = str(row.get("task") or getattr(gen, "task", "") or "").strip()
    if not task:
        return [], _reject(ref, "missing_task", "column 'task' is missing and generate.task is empty; e.g. t2i")
    if (err := check_task(task)) is not None:
        return [], _reject(ref, "unknown_task", err)
    try:
        if row.get("size") is not None:
            width, height = parse_size(row["size"])
        elif row.get("width") is not None or row.get("height") is not None:
            width, height = _as_int(row.get("width"), "width"), _as_int(row.get("height"), "height")
        elif gen.size:
            width, height = parse_size(gen.size)
        else:
            return [], _reject(ref, "missing_size", "no size/width+height in the row and no generate.size default; set generate.size, e.g. 512x512")
        count = _as_int(row.get("count", gen.count_per_prompt), "count")
        seed = _as_int(row["seed"], "seed") if row.get("seed") is not None else None
    except ValueError as e:
        return [], _reject(ref, "malformed_row", str(e))
    if (err := check_size(width, height, task, gen.max_side)) is not None:
        return [], _reject(ref, "bad_size", err)
    if not 1 <= count <= gen.max_count:
        return [], _reject(ref, "bad_count", f"count {count} outside 1..{gen.max_count} (generate.max_count)")
    if seed is not None and not 0 <= seed < 2**63:
        return [], _reject(ref, "malformed_row", f"seed {seed} outside 0..2^63-1")
    upper_png = None
    if needs_upper(task):
        try:
            upper_png = _upper_panel(row, task, width, height, base_dir, maps)
        except LookupError as e:
            return [], _reject(ref, "missing_upper", str(e))
        except ValueError as e:
            return [], _reject(ref, "bad_upper", str(e))
    elif row.get("upper") is not None or row.get("control_source") is not None:
        return [], _reject(ref, "unexpected_upper", f"task {task!r} generates its whole image; drop 'upper'/'control_source' or use an image-to-image task")

    caption = prompt.strip()
    params: dict = {"input_caption": caption}
    if rewrite is not None:
        caption = rewrite(caption)
        params["rewritten"] = caption != params["input_caption"]
        failed = getattr(rewrite, "failure", lambda _: None)(params["input_caption"])
        if failed:  # the pair keeps its own prompt; say why, so that it can be redone on purpose
            params["rewrite_error"] = failed
    extra = {k: str(row[k]).strip() for k in ("instruction", "subject") if row.get(k) is not None}
    params.update(extra)
    if fields := unused_fields(row):
        params["fields"] = fields
    try:
        rendered = render_prompt(task, width, height, caption=caption, **extra)
    except PromptError as e:
        return [], _reject(ref, "malformed_row", f"{e}; edit and pair rows need 'instruction', subject rows 'subject'")
    if context is not None and (err := context.check(rendered, width, height)) is not None:
        return [], _reject(ref, "too_long", err)
    pairs = [
        PairSpec(
            id=f"{row_id}#{k}",
            row_id=row_id,
            task=task,
            caption=caption,
            prompt=rendered,
            width=width,
            height=height,
            seed=(seed + k) % 2**63 if seed is not None else derive_seed(gen.seed, row_id, k),
            source=ref,
            upper=upper_png,
            params=params,
        )
        for k in range(count)
    ]
    return pairs, None


def _first(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if row.get(k) not in (None, "")), None)


def unused_fields(row: dict) -> dict:
    """The row's fields the job does not read (GenEval's tag/include/exclude, ...), JSON-able."""
    used = set(USED_KEYS)
    used.update(k for keys in (PROMPT_KEYS, ID_KEYS) for k in keys[:1])
    for keys in (PROMPT_KEYS, ID_KEYS):  # the alias that was read is used; the others are kept
        hit = next((k for k in keys if row.get(k) not in (None, "")), None)
        if hit:
            used.add(hit)
    out = {}
    for k, v in row.items():
        if k in used or k.startswith("_"):
            continue
        if isinstance(v, (bytes, bytearray)):
            v = f"<{len(v)} bytes>"  # parquet blobs stay out of params: they are JSON
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            v = str(v)
        out[str(k)] = v
    return out


def _upper_panel(row: dict, task: str, width: int, height: int, base_dir: Path | None, maps) -> bytes:
    """PNG bytes of the upper panel at (width, height/2): from 'upper', or computed from 'control_source'."""
    given, source = row.get("upper"), row.get("control_source")
    if given is None and source is None:
        raise LookupError(f"task {task!r} needs an upper image: give 'upper' (or 'control_source' for control tasks)")
    if given is not None and source is not None:
        raise ValueError("give either 'upper' or 'control_source', not both")
    data = given if given is not None else source
    if isinstance(data, str):
        path = Path(data) if Path(data).is_absolute() or base_dir is None else base_dir / data
        if not path.is_file():
            raise LookupError(f"upper image {str(path)!r} not found")
        data = path
    elif not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"'upper' must be a path or image bytes, got {type(data).__name__}")
    img = fit_panel(decode_image(data), width, height // 2)
    if source is not None:  # the map is computed at the panel's size, so its edges stay one pixel wide
        if not task.startswith("control:"):
            raise ValueError(f"'control_source' only applies to control tasks, not {task!r}")
        img = control_map(img, task.split(":", 1)[1], maps)
    return png_bytes(img)


# ---------------------------------------------------------------------------------------------
# The three input kinds


def expand_inputs(cfg, rewrite: Callable[[str], str] | None = None) -> Expanded:
    """All pairs of the job described by cfg.generate.inputs, and the rejected rows."""
    gen = cfg.generate
    spec = dict(gen.inputs)
    kind = spec.get("kind")
    if kind == "file":
        rows = _file_rows(spec)
    elif kind == "panels":
        rows = _panels_rows(cfg, spec)
    elif kind == "shapes":
        rows = _shapes_rows(cfg, spec)
    else:
        raise RequestError(f"generate.inputs.kind {kind!r}: expected file, panels or shapes")
    return _expand_rows(rows, gen, cfg.panels, rewrite, prompt_context(cfg))


def _expand_rows(rows: Iterable[tuple[str, dict, Path | None]], gen, maps, rewrite,
                 context: PromptContext | None = None) -> Expanded:
    pairs: list[PairSpec] = []
    rejects: list[dict] = []
    seen: dict[str, str] = {}
    n = 0
    for ref, row, base_dir in rows:
        n += 1
        rid = str(_first(row, ID_KEYS) or ref) if "_error" not in row else ref
        if rid in seen:
            rejects.append(_reject(ref, "duplicate_id", f"row id {rid!r} already used by {seen[rid]}; ids must be unique"))
            continue
        seen[rid] = ref
        got, rej = expand_row(row, ref, gen=gen, maps=maps, base_dir=base_dir, rewrite=rewrite, context=context)
        pairs.extend(got)
        if rej:
            rejects.append(rej)
    if n and len(pairs) > gen.max_pairs:
        raise RequestError(f"the job asks for {len(pairs)} pairs, more than generate.max_pairs={gen.max_pairs}; split it or raise the limit")
    return Expanded(pairs, rejects, n)


def _file_rows(spec: dict) -> Iterator[tuple[str, dict, Path | None]]:
    """(ref, row, folder) of a prompt file: consecutive rows with the same id and prompt merged (one
    prompt of DPG-Bench's csv per question), the first generate.inputs.count rows when it is set."""
    unknown = sorted(set(spec) - {"kind", "path", "count"})
    if unknown:
        raise RequestError(f"generate.inputs: unknown keys {unknown} for kind=file; expected path and count")
    if not spec.get("path"):
        raise RequestError("generate.inputs.kind=file needs generate.inputs.path (a jsonl, csv or parquet file)")
    path = Path(spec["path"])
    limit = spec.get("count")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise RequestError(f"generate.inputs.count {limit!r}: the number of prompt rows to take, an integer >= 1")
    base = path if path.is_dir() else path.parent
    n = 0
    group: tuple[str, dict] | None = None
    for i, row in read_rows(path):
        key = None if "_error" in row else (_first(row, ID_KEYS), _first(row, PROMPT_KEYS))
        if group is not None and key is not None and key[0] is not None and key == group[2]:
            _merge(group[1], row)
            continue
        if group is not None:
            yield group[0], group[1], base
            n += 1
            if limit is not None and n >= limit:
                return
        group = (f"{path.name}:{i}", dict(row), key)
    if group is not None and (limit is None or n < limit):
        yield group[0], group[1], base


def _merge(into: dict, row: dict) -> None:
    """Gather the fields of another row of the same prompt: a field that differs becomes a list."""
    n_before = into.setdefault("_merged", 1)
    for k, v in row.items():
        if k in into and not isinstance(into.get(f"_list:{k}"), bool) and into[k] == v:
            continue
        if not into.get(f"_list:{k}"):
            into[k] = [into.get(k)] * n_before
            into[f"_list:{k}"] = True
        into[k].append(v)
    for k in [k for k in into if into.get(f"_list:{k}") and k not in row]:
        into[k].append(None)
    into["_merged"] = n_before + 1


def panel_as_prompt_row(row: dict) -> dict:
    """A panels row as a prompt row: same id, task, caption, size and given upper panel."""
    params = json.loads(row.get("params") or "{}")
    out = {"id": row["id"], "task": row["task"], "prompt": row.get("caption") or "", "width": row["width"], "height": row["height"]}
    for k in ("instruction", "subject"):
        if params.get(k):
            out[k] = params[k]
    if needs_upper(row["task"]):
        out["upper"] = row["upper"]
    return out


def _panels_rows(cfg, spec: dict) -> Iterator[tuple[str, dict, Path | None]]:
    """Panels rows as prompt rows: same task, caption, size and upper panel; the lower is redone."""
    from storage import open_dataset

    uri = spec.get("uri") or cfg.dataset_uri("panels")
    ds = open_dataset(uri)
    if ds.kind not in ("panels", "generated"):
        raise RequestError(f"{uri}: a {ds.kind} dataset; generate.inputs.kind=panels needs a panels dataset")
    tasks = set(spec.get("tasks") or [])
    limit = spec.get("limit")
    n = 0
    for batch in ds.iter_batches(64):
        for row in batch.to_pylist():
            if tasks and row["task"] not in tasks:
                continue
            if limit is not None and n >= limit:
                return
            n += 1
            out = panel_as_prompt_row(row)
            yield f"{uri}:{row['id']}", out, None


def _shapes_rows(cfg, spec: dict) -> Iterator[tuple[str, dict, Path | None]]:
    """Prompt rows from the synthetic shapes source (tasks/shapes/scenes.py): scene i has seed seed+i and
    task tasks[i % len(tasks)]; its given upper panel (control map, image, edit source, subject)
    is rendered at the panel size."""
    from tasks.shapes import scenes as shapes

    count, seed = int(spec.get("count", 8)), int(spec.get("seed", 0))
    tasks = list(spec.get("tasks") or ["t2i"])
    width, height = parse_size(spec.get("size") or cfg.generate.size or "128x128")
    ph = height // 2
    for i in range(count):
        task, s = tasks[i % len(tasks)], seed + i
        row: dict = {"id": f"shapes-{s}-{task}", "task": task, "width": width, "height": height}
        ref = f"shapes:{s}:{task}"
        if check_task(task) is not None or width % 32 or height % 32:
            yield ref, row | {"prompt": "?"}, None  # expand_row rejects it with the reason
            continue
        kind, control = split_task(task)
        if kind == "t2i":
            row["prompt"] = shapes.render_scene(s, width, height).caption
        elif kind in ("pair", "edit"):
            ep = shapes.edit_pair(s, width, ph)
            row["prompt"] = ep.source.caption
            row["instruction"] = ep.target.caption if kind == "pair" else ep.instruction
            if kind == "edit":
                row["upper"] = png_bytes(ep.source.image)
        elif kind == "subject":
            sp = shapes.subject_pair(s, width, ph)
            row.update(prompt=sp.scene.caption, subject=sp.description, upper=png_bytes(sp.subject.image))
        else:
            scene = shapes.render_scene(s, width, ph)
            row["prompt"] = scene.caption
            if kind == "dense":
                row["upper"] = png_bytes(scene.image)
            elif control in ("canny", "hed"):
                row["upper"] = png_bytes(control_map(Image.fromarray(scene.image), control, cfg.panels))
            elif control == "depth":  # the exact depth the renderer knows, drawn as estimators draw it
                row["upper"] = png_bytes(np.repeat(scene.depth_vis[..., None], 3, axis=2))
            # pose maps have no people to come from: expand_row rejects the row (missing_upper)
        yield ref, row, None


def main() -> None:
    import argparse

    from tasks.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    ex = expand_inputs(load_config(args.config, args.overrides))
    for p in ex.pairs[:20]:
        print(p.id, p.task, f"{p.width}x{p.height}", p.seed, repr(p.prompt[:80]))
    for r in ex.rejects:
        print("REJECT", r["input_ref"], r["reason"], r["detail"])
    print(json.dumps(ex.summary()))


if __name__ == "__main__":
    main()
