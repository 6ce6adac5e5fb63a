"""The pretokenize Ray Data job: panels -> tokens (MoVQGAN codes + prompt ids in the layout).

    python -m tasks.tokenize.job configs/tiny.yaml              # the job alone, no Prefect
    python -m tasks.tokenize.job configs/tiny.yaml --no-ray     # the same units in this process

The driver groups the panel rows by resolution bucket (the whole image's width x height), cuts each
bucket into work units of tokenize.rows_per_unit rows and skips the units the tokens manifest
already lists, so a rerun finishes only the rest. On Ray, two Ray Data stages: CPU actors
(`DecodeStage`, tokenize.decode_workers) read a unit's rows, check them and decode the panels,
ahead of the encoder actors (`EncodeStage`, tokenize.workers, num_gpus each: one MoVQGAN and one
layout per actor; bf16, channels-last, and with tokenize.compile one CUDA graph per bucket shape
on GPUs), which encode the whole image (upper panel over lower) in batches of one size, tokenize
the prompt and write the unit's shard with storage.write_shard. Without Ray, the next unit
decodes on a thread while this one encodes; both paths write the same bytes. Rows that cannot be used become rejects with a reason: bad_size (not a
multiple of 32 px, the size-token unit, or panels that do not add up to the row's size),
undecodable, too_long (the sample overflows tokenize.max_seq), bad_prompt.

The tokens manifest's meta holds the layout fingerprint and the MoVQGAN weights' hash, so a
resumed or appended run can never mix layouts or tokenizers.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model.layout import SIZE_UNIT, Layout, LayoutError
from model.movqgan import TINY_ASSET, MoVQGAN, load_movqgan
from storage import TOKENS, DatasetWriter, StorageError, open_dataset, write_shard
from storage.hashing import file_sha256
from tasks.config import ModelsConfig, PipelineConfig, TokenizeConfig, load_config
from tasks.panels.compose import Reject, decode_panel

log = logging.getLogger(__name__)

# Settings that change no output byte; a resumed run may change them freely.
RUN_ONLY = {"workers", "num_gpus", "decode_threads", "decode_workers", "compile", "overwrite", "batch_size", "output",
            "input"}
PANEL_COLUMNS = ["id", "task", "prompt", "width", "height", "upper", "lower"]


class TokenizeError(ValueError):
    """A job that cannot start: wrong input dataset, missing weights. Says what to change."""


def dataset_uri(cfg: PipelineConfig, name: str) -> str:
    return name if "://" in name or name.startswith("/") else cfg.dataset_uri(name)


def movqgan_weights(models: ModelsConfig) -> str:
    """The weights file of the config: movqgan_path, else the shipped tiny model for the tiny preset."""
    if models.movqgan_path:
        return models.movqgan_path
    if models.movqgan_preset == "tiny" and TINY_ASSET.is_file():
        return str(TINY_ASSET)
    raise TokenizeError(
        f"models.movqgan_path is not set and preset {models.movqgan_preset!r} ships no weights: point it at the "
        "MoVQGAN checkpoint (.ckpt/.pt state_dict or .safetensors); nothing is downloaded"
    )


def open_panels(uri: str):
    """The input panels dataset, or a TokenizeError that says why it cannot be tokenized."""
    try:
        ds = open_dataset(uri, check=True)  # a damaged panel shard stops the job, named
    except StorageError as e:  # missing, unreadable, or another schema version
        raise TokenizeError(f"cannot tokenize {uri}: {e}") from None
    if ds.kind != "panels":
        raise TokenizeError(f"{uri}: is a {ds.kind!r} dataset; pretokenize reads panels (build them first, "
                            "or pass generated rows through build_panels)")
    return ds


def list_units(ds, rows_per_unit: int) -> list[dict]:
    """Deterministic units: rows grouped by bucket (sorted), cut into runs of rows_per_unit."""
    if rows_per_unit < 1:
        raise TokenizeError(f"tokenize.rows_per_unit {rows_per_unit}: must be >= 1")
    sizes = ds.table(columns=["width", "height"])
    by_bucket: dict[str, list[int]] = defaultdict(list)
    for i, (w, h) in enumerate(zip(sizes.column("width").to_pylist(), sizes.column("height").to_pylist())):
        by_bucket[f"{w}x{h}"].append(i)
    units = []
    for bucket in sorted(by_bucket, key=lambda b: tuple(int(x) for x in b.split("x"))):
        rows = by_bucket[bucket]
        for k, s in enumerate(range(0, len(rows), rows_per_unit)):
            units.append({"unit": f"{bucket}-{k:05d}", "bucket": bucket, "rows": rows[s:s + rows_per_unit]})
    return units


class Tokenizer:
    """One MoVQGAN + one layout: tokenizes units of panel rows. One per actor (or per process)."""

    def __init__(self, panels_uri: str, out: str, models: dict, tokenize: dict, device: str | None = None,
                 encoder: bool = True):
        import torch

        self.tc = TokenizeConfig.model_validate(tokenize)
        mc = ModelsConfig.model_validate(models)
        self.panels_uri, self.out = panels_uri, out
        if device is None:
            device = "cuda" if self.tc.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.model: MoVQGAN | None = None
        if encoder:  # the decode stage of the Ray path has no encoder
            self.model = load_movqgan(movqgan_weights(mc), mc.movqgan_preset, config=mc.movqgan).prepare(
                device, compile=self.tc.compile)
        # the loaded model's codebook; the decode stage reads it from the architecture (no weights)
        self.layout = Layout.from_config(mc, codebook_size=self.model.n_embed if self.model is not None else None)
        self.pool = ThreadPoolExecutor(max(1, self.tc.decode_threads))
        self._ds = None

    @property
    def ds(self):
        if self._ds is None:
            self._ds = open_panels(self.panels_uri)
        return self._ds

    def _check(self, row: dict) -> list[int]:
        """Validate one row before any pixel is decoded; returns its prompt ids."""
        w, h = row["width"], row["height"]
        if w <= 0 or h <= 0 or w % SIZE_UNIT or h % SIZE_UNIT:
            raise Reject("bad_size", f"{w}x{h} is not a multiple of {SIZE_UNIT} px (the size-token unit, a multiple "
                         "of MoVQGAN's 8 px patch): rebuild the panels with buckets", stage="tokenize")
        if not row["prompt"] or not row["prompt"].strip():
            raise Reject("bad_prompt", "empty prompt", stage="tokenize")
        ids = self.layout.encode_prompt(row["prompt"])
        total = len(ids) + self.layout.image_length(h, w) + 1
        if total > self.tc.max_seq:
            raise Reject("too_long", f"{total} tokens ({len(ids)} prompt + image {w}x{h}) > tokenize.max_seq "
                         f"{self.tc.max_seq}: shorten the prompt or use a smaller bucket", stage="tokenize")
        return ids

    def _pixels(self, row: dict) -> np.ndarray:
        """The whole image: upper panel over lower (or the single image), checked against the row's size."""
        w, h = row["width"], row["height"]
        try:
            upper = decode_panel(row["upper"])
            lower = decode_panel(row["lower"]) if row["lower"] is not None else None
        except Exception as e:  # noqa: BLE001 - cv2 raises several kinds on corrupt bytes
            raise Reject("undecodable", f"panel bytes do not decode as an image ({e})", stage="tokenize") from None
        fits = lower is None or upper.shape[1] == lower.shape[1]
        image = upper if lower is None else np.concatenate([upper, lower], axis=0) if fits else upper
        if not fits or image.shape[:2] != (h, w):
            got = f"{upper.shape[1]}x{upper.shape[0]}" + (f" over {lower.shape[1]}x{lower.shape[0]}" if lower is not None else "")
            raise Reject("bad_size", f"the panels ({got}) do not make the row's {w}x{h} image", stage="tokenize")
        return image

    def prepare_unit(self, unit: dict) -> dict:
        """The CPU half of a unit: read its rows, check them, decode and stack their images.

        Returns the unit, the rows that passed the checks (without their image bytes) with
        their prompt ids, the checks' rejects, and for each good row either None (its image is
        the next of `pixels`, uint8 [n, H, W, 3]: one bucket, one size) or its decode reject.
        """
        t0 = time.perf_counter()
        table = self.ds.take(unit["rows"], columns=PANEL_COLUMNS)
        rows = table.to_pylist()
        rejects, good = [], []
        for row in rows:
            try:
                ids = self._check(row)
                good.append(row | {"prompt_ids": ids})
            except Reject as r:
                rejects.append(r.row(row["id"]))
        images, status = [], []
        for row, res in zip(good, self.pool.map(self._safe_pixels, good)):
            if isinstance(res, Reject):
                status.append(res.row(row["id"]))
            else:
                status.append(None)
                images.append(res)
        keep = ("id", "task", "prompt_ids")
        return {"unit": unit, "rows_in": len(rows), "good": [{k: r[k] for k in keep} for r in good],
                "rejects": rejects, "status": status, "pixels": np.stack(images) if images else None,
                "seconds_decode": time.perf_counter() - t0}

    def encode_unit(self, prepared: dict) -> dict:
        """The encoder half: MoVQGAN codes in batches of batch_size, the samples in the layout,
        the shard written. Rejects keep the order of the one-actor path (checks, then per batch
        the decode rejects and the layout rejects), so the shard bytes do not depend on the path."""
        t0 = time.perf_counter()
        unit, good, status = prepared["unit"], prepared["good"], prepared["status"]
        rejects = list(prepared["rejects"])
        pixels = prepared["pixels"]
        out_rows = []
        timing = {"decode": prepared["seconds_decode"], "encode": 0.0, "write": 0.0}
        bs = max(1, self.tc.batch_size)
        next_image = 0
        for s in range(0, len(good), bs):
            ok = []
            for row, st in zip(good[s:s + bs], status[s:s + bs]):
                if st is not None:
                    rejects.append(st)
                else:
                    ok.append((row, next_image))
                    next_image += 1
            if not ok:
                continue
            t = time.perf_counter()
            codes = self.model.encode(pixels[ok[0][1]:ok[-1][1] + 1], batch_size=bs).cpu().numpy()
            timing["encode"] += time.perf_counter() - t
            for (row, _), grid in zip(ok, codes):
                try:
                    ids = row["prompt_ids"] + self.layout.image_tokens(grid) + [self.layout.turn_end]
                except LayoutError as e:
                    rejects.append({"input_ref": row["id"], "stage": "tokenize", "reason": "layout", "detail": str(e)})
                    continue
                out_rows.append({"id": row["id"], "task": row["task"], "bucket": unit["bucket"],
                                 "grid_h": int(grid.shape[0]), "grid_w": int(grid.shape[1]),
                                 "tokens": np.asarray(ids, np.int32), "loss_start": len(row["prompt_ids"])})
        t = time.perf_counter()
        out = _tokens_table(out_rows)
        info = write_shard(self.out, unit["unit"], out, rejects or None, kind="tokens")
        timing["write"] = time.perf_counter() - t
        info["counts"] = {"bucket": unit["bucket"], "rows_in": prepared["rows_in"], "rows_out": len(out_rows),
                          "rejects": len(rejects), "tokens": int(sum(len(r["tokens"]) for r in out_rows)),
                          "seconds": timing["decode"] + time.perf_counter() - t0,
                          **{f"seconds_{k}": v for k, v in timing.items()}}
        return info

    def run_unit(self, unit: dict) -> dict:
        """Tokenize one unit in this process; write its shard and rejects; return the info to commit."""
        return self.encode_unit(self.prepare_unit(unit))

    def _safe_pixels(self, row: dict):
        try:
            return self._pixels(row)
        except Reject as r:
            return r


def _tokens_table(rows: list[dict]) -> pa.Table | None:
    if not rows:
        return None
    cols = {name: [r[name] for r in rows] for name in ("id", "task", "bucket", "grid_h", "grid_w", "loss_start")}
    lengths = np.array([len(r["tokens"]) for r in rows], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.concatenate([r["tokens"] for r in rows]).astype(np.int32)
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    arrays = [pa.array(cols[f.name], f.type) if f.name != "tokens" else tokens for f in TOKENS]
    return pa.Table.from_arrays(arrays, schema=TOKENS)


class DecodeStage:
    """Ray Data's CPU stage: a unit -> its rows checked and its images decoded (no encoder)."""

    def __init__(self, **kwargs):
        self.tok = Tokenizer(**kwargs, device="cpu", encoder=False)

    def __call__(self, batch: dict) -> dict:
        metas, pixels = [], []
        for u in batch["unit"]:
            unit = json.loads(u)
            try:
                p = self.tok.prepare_unit(unit)
            except Exception as e:  # noqa: BLE001 - surface the unit's failure with its name
                raise RuntimeError(f"tokenize unit {unit['unit']} (decode): {type(e).__name__}: {e}\n"
                                   f"{traceback.format_exc()}") from None
            px = p.pop("pixels")
            p["shape"] = None if px is None else list(px.shape)
            metas.append(json.dumps(p))
            pixels.append(b"" if px is None else px.tobytes())
        return {"prepared": np.array(metas, dtype=object), "pixels": np.array(pixels, dtype=object)}


class EncodeStage:
    """Ray Data's encoder stage (num_gpus per actor on GPUs): decoded units -> shards written."""

    def __init__(self, **kwargs):
        self.tok = Tokenizer(**kwargs)

    def __call__(self, batch: dict) -> dict:
        results = []
        for meta, raw in zip(batch["prepared"], batch["pixels"]):
            p = json.loads(meta)
            shape = p.pop("shape")
            p["pixels"] = None if shape is None else np.frombuffer(raw, np.uint8).reshape(shape)
            try:
                info = self.tok.encode_unit(p)
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"tokenize unit {p['unit']['unit']} (encode): {type(e).__name__}: {e}\n"
                                   f"{traceback.format_exc()}") from None
            results.append(json.dumps(info, default=str))
        return {"result": np.array(results, dtype=object)}


def staged_units(todo: list[dict], kwargs: dict, tc: TokenizeConfig):
    """Ray Data stages: CPU actors decode units ahead of the encoder actors (one per GPU on GPUs),
    so the encoder never waits on PNG decoding; yields each unit's shard info as it lands."""
    import ray.data

    if not todo:
        return
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = False
    items = [{"unit": json.dumps(u)} for u in todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(DecodeStage, fn_constructor_kwargs=kwargs, batch_size=1, num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=max(1, min(tc.decode_workers, len(items)))))
    ds = ds.map_batches(EncodeStage, fn_constructor_kwargs=kwargs, batch_size=1, num_cpus=1, num_gpus=tc.num_gpus,
                        compute=ray.data.ActorPoolStrategy(size=max(1, min(tc.workers, len(items)))))
    for row in ds.iter_rows():
        yield json.loads(row["result"])


def run_tokenize(cfg: PipelineConfig, progress: Callable[[dict], None] | None = None, use_ray: bool = True) -> dict:
    """Tokenize (or finish tokenizing) the panels of a config; returns the summary (no data)."""
    tc = cfg.tokenize
    panels_uri, out = dataset_uri(cfg, tc.input), dataset_uri(cfg, tc.output)
    panels = open_panels(panels_uri)
    weights = movqgan_weights(cfg.models)
    layout = Layout.from_config(cfg.models.model_copy(update={"movqgan_path": weights}))
    units = list_units(panels, tc.rows_per_unit)
    meta = {**layout.meta(), "max_seq": tc.max_seq,
            "movqgan": {"preset": cfg.models.movqgan_preset, "weights": Path(weights).name, "sha256": file_sha256(weights)}}
    config = {k: v for k, v in tc.model_dump().items() if k not in RUN_ONLY}
    writer = DatasetWriter(out, "tokens", config=config, inputs=[panels.manifest], meta=meta, overwrite=tc.overwrite)
    done = writer.done_units
    todo = [u for u in units if u["unit"] not in done]
    log.info("tokenize: %d panels in %d units (%d already done), layout %s -> %s", len(panels), len(units),
             len(units) - len(todo), layout.fingerprint, out)
    kwargs = {"panels_uri": panels_uri, "out": out, "models": cfg.models.model_dump(), "tokenize": tc.model_dump()}

    def results():
        if not todo:  # every unit is committed: a rerun loads no model and starts no Ray
            return
        if not use_ray:  # this process: the next unit decodes on a thread while this one encodes
            worker = Tokenizer(**kwargs)
            with ThreadPoolExecutor(1) as ahead:
                pending = ahead.submit(worker.prepare_unit, todo[0]) if todo else None
                for i in range(len(todo)):
                    prepared = pending.result()
                    pending = ahead.submit(worker.prepare_unit, todo[i + 1]) if i + 1 < len(todo) else None
                    yield worker.encode_unit(prepared)
            return
        from tasks.ray_jobs import ray_started

        with ray_started(cfg.ray):
            yield from staged_units(todo, kwargs, tc)

    t0 = time.perf_counter()
    run = Counter()
    state = {"units_total": len(units), "units_done": len(units) - len(todo)}
    for info in results():
        counts = info.pop("counts")
        writer.commit(info)
        state["units_done"] += 1
        run.update({k: v for k, v in counts.items() if k != "bucket"})
        state.update(rows_out=run["rows_out"], rejects=run["rejects"], seconds=time.perf_counter() - t0)
        state["rows_per_s"] = run["rows_in"] / max(state["seconds"], 1e-9)
        log.info("tokenize: unit %s done (%d/%d), %d rows, %d rejects this run, %.2f rows/s", info["unit"],
                 state["units_done"], state["units_total"], run["rows_out"], run["rejects"], state["rows_per_s"])
        if progress is not None:
            progress(dict(state))
    seconds = time.perf_counter() - t0
    ds = open_dataset(out)
    per_bucket = bucket_stats(ds)
    rejects = sum(e["rows"] for e in ds.manifest["rejects"])
    summary = {
        "dataset": out, "input": panels_uri, "fingerprint": layout.fingerprint,
        "rows_in": len(panels), "rows_out": len(ds), "rejects": rejects, "balanced": len(panels) == len(ds) + rejects,
        "rejects_per_reason": ds.reject_counts(), "buckets": per_bucket,
        "tokens": sum(b["tokens"] for b in per_bucket),
        "units_total": len(units), "units_run": len(todo), "units_skipped": len(units) - len(todo),
        "seconds": round(seconds, 3),
        "throughput": {
            "rows_per_s": round(run["rows_in"] / seconds, 3) if todo and seconds > 0 else None,
            "tokens_per_s": round(run["tokens"] / seconds, 1) if todo and seconds > 0 else None,
            # actor-side seconds summed over units: where the time went
            "decode_s": round(run["seconds_decode"], 3), "encode_s": round(run["seconds_encode"], 3),
            "write_s": round(run["seconds_write"], 3), "unit_s": round(run["seconds"], 3),
        },
    }
    writer.finalize(**{k: summary[k] for k in ("rows_in", "rows_out", "rejects", "balanced", "tokens")})
    return summary


def bucket_stats(ds) -> list[dict]:
    """Samples and tokens per bucket of a tokens dataset (for the artifact and the trainer's batching)."""
    t = ds.table(columns=["bucket", "tokens", "loss_start"])
    lengths = pc.list_value_length(t.column("tokens")).to_numpy()
    buckets = np.array(t.column("bucket").to_pylist(), dtype=object)
    out = []
    for b in sorted(set(buckets.tolist()), key=lambda s: tuple(int(x) for x in s.split("x"))):
        m = buckets == b
        out.append({"bucket": b, "samples": int(m.sum()), "tokens": int(lengths[m].sum()),
                    "mean_len": round(float(lengths[m].mean()), 1), "max_len": int(lengths[m].max())})
    return out


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="pretokenize panels into tokens (no Prefect)")
    ap.add_argument("config", nargs="?", default="configs/tiny.yaml")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--no-ray", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(run_tokenize(load_config(a.config, a.overrides), use_ray=not a.no_ray), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
