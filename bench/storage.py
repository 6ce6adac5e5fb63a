"""Storage throughput: storage/ against bare pyarrow doing the same Arrow IPC writes and reads;
and the cost of one commit as a dataset grows.

    .venv/bin/python -m bench.storage                  # 200k rows of ~1,000 int32 tokens
    .venv/bin/python -m bench.storage --rows 20000     # a quick run
    .venv/bin/python -m bench.storage --commit-scaling # one commit at 1,000 / 10,000 / 100,000 units

Both sides write the same tables as the same number of IPC files, and read them back memory-
mapped, touching every token (a sum), so that both pay for the same bytes. storage/ does more:
temp name + rename, the xxh3-128 hash of every shard, the shard fsynced before one fsynced
commit record per shard; so the writes are compared with bare pyarrow fsyncing its files too
(the headline ratio: writing at the disk's pace) and with bare pyarrow leaving them in the page
cache (what the hash, the renames and the commits cost on top). Its reads check each shard's
hash on first open (the default; the run without checks is printed too). Every timed step
starts after an untimed os.sync(), so no round pays for an earlier one's writeback; the rounds
rotate which side goes first, and both the best round of each side and the median of the
ratios measured within a round are reported (the machine may be shared). Results are printed and saved to bench/results/storage.json (--commit-scaling:
bench/results/storage-commits.json).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench import save_result
from storage import DatasetWriter, open_dataset
from storage.dataset import _VERIFIED, _compact, _fsync
from storage.uri import resolve


def make_tables(rows: int, per_shard: int, mean_len: int, seed: int = 0) -> list[pa.Table]:
    rng = np.random.default_rng(seed)
    tables = []
    for start in range(0, rows, per_shard):
        n = min(per_shard, rows - start)
        lengths = rng.integers(mean_len - 100, mean_len + 101, n).astype(np.int32)
        offsets = np.zeros(n + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = rng.integers(0, 171_385, int(offsets[-1]), dtype=np.int32)
        tables.append(
            pa.table(
                {
                    "id": [f"r{start + i:07d}" for i in range(n)],
                    "task": ["t2i"] * n,
                    "bucket": ["256x256"] * n,
                    "grid_h": pa.array(np.full(n, 32, np.int32)),
                    "grid_w": pa.array(np.full(n, 32, np.int32)),
                    "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                    "loss_start": pa.array(np.full(n, 40, np.int32)),
                }
            )
        )
    return tables


def bare_write(folder: Path, tables: list[pa.Table], durable: bool = False) -> None:
    """pyarrow's own IPC writes; `durable` fsyncs each file and the folder, as storage/ does
    before it commits a shard (without it the bytes may still be only in the page cache)."""
    folder.mkdir(parents=True)
    for i, table in enumerate(tables):
        path = folder / f"{i:05d}.arrow"
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        if durable:
            _fsync(path)
    if durable:
        _fsync(folder)


def bare_write_durable(folder: Path, tables: list[pa.Table]) -> None:
    bare_write(folder, tables, durable=True)


def bare_read(folder: Path) -> tuple[int, int]:
    rows = total = 0
    for path in sorted(folder.iterdir()):
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        for batch in table.to_batches(max_chunksize=4096):
            total += int(np.asarray(batch.column("tokens").values).sum(dtype=np.int64))
            rows += batch.num_rows
    return rows, total


def storage_write(folder: Path, tables: list[pa.Table]) -> None:
    w = DatasetWriter(folder, "tokens", meta={"layout_fingerprint": "bench"})
    for i, table in enumerate(tables):
        w.write_unit(f"{i:05d}", table)
    w.finalize()


def storage_read(folder: Path, check: bool = True) -> tuple[int, int]:
    # A fresh process would check each shard once: forget what this one has checked.
    _VERIFIED.clear()
    rows = total = 0
    for batch in open_dataset(folder, check=check).iter_batches(batch_size=4096):
        total += int(np.asarray(batch.column("tokens").values).sum(dtype=np.int64))
        rows += batch.num_rows
    return rows, total


def timed(fn, *args):
    os.sync()  # untimed: no earlier round's dirty pages are written back during this one
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def commit_scaling(sizes: list[int], commits: int, scratch: Path) -> dict:
    """Time single commits into datasets that already list n units, one dataset per n. The
    commits go round-robin over the datasets, so a load that changes during the run (the
    machine is shared) weighs on every size alike."""
    entry = {"rows": 64, "bytes": 300_000, "xxh3_128": "0" * 32, "rows_per_task": {"t2i": 64}}
    writers, out = {}, {}
    for n in sizes:
        folder = scratch / f"commits-{n}"
        w = DatasetWriter(folder, "tokens", meta={"layout_fingerprint": "bench"})
        units = {f"{u:07d}": {"shard": dict(entry, unit=f"{u:07d}", file=f"shards/{u:07d}.arrow"), "rejects": None}
                 for u in range(n)}
        t = time.perf_counter()
        _compact(resolve(folder), w._header, units)  # what folding a log into manifest.json costs at n
        fold = time.perf_counter() - t
        w.close()
        t = time.perf_counter()
        writers[n] = DatasetWriter(folder, "tokens", meta={"layout_fingerprint": "bench"})  # a rerun opening it
        out[n] = {"fold_s": round(fold, 3), "fold_per_commit_ms": round(1e3 * fold / n, 4),
                  "open_writer_s": round(time.perf_counter() - t, 3)}
        assert len(writers[n].done_units) == n
    times = {n: [] for n in sizes}
    for k in range(commits):
        for n in sizes:
            unit = f"{n + k:07d}"
            info = {"unit": unit, "shard": dict(entry, unit=unit, file=f"shards/{unit}.arrow"), "rejects": None}
            t = time.perf_counter()
            writers[n].commit(info)
            times[n].append(time.perf_counter() - t)
    for n in sizes:
        writers[n].close()
        t = time.perf_counter()
        assert len(open_dataset(scratch / f"commits-{n}").manifest["units"]) == n + commits
        ts = sorted(times[n])
        out[n].update(median_ms=round(1e3 * ts[len(ts) // 2], 3), p90_ms=round(1e3 * ts[int(0.9 * len(ts))], 3),
                      max_ms=round(1e3 * ts[-1], 3), read_manifest_s=round(time.perf_counter() - t, 3))
        shutil.rmtree(scratch / f"commits-{n}")
        r = out[n]
        print(f"{n:>8,} units: one commit median {r['median_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, max {r['max_ms']:.3f} ms; "
              f"fold {r['fold_s']:.3f} s ({r['fold_per_commit_ms']:.4f} ms a commit, amortised); "
              f"open writer {r['open_writer_s']:.3f} s, read manifest {r['read_manifest_s']:.3f} s", flush=True)
    medians = [r["median_ms"] for r in out.values()]
    return {"sizes": out, "spread": round(max(medians) / min(medians), 2), "commits_timed": commits,
            "load": os.getloadavg(), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--tokens", type=int, default=1000, help="mean tokens per row")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="bench/results/storage.json")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--commit-scaling", action="store_true", help="time one commit at 1,000, 10,000 and 100,000 units")
    ap.add_argument("--commits", type=int, default=300, help="commits timed at each size (--commit-scaling)")
    args = ap.parse_args()

    if args.commit_scaling:
        scratch = Path(args.dir or tempfile.mkdtemp(prefix="pf-bench-"))
        try:
            result = commit_scaling([1_000, 10_000, 100_000], args.commits, scratch)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        print(f"largest / smallest median commit: {result['spread']:.2f}x (goal: within 2x)")
        out = Path(args.out).with_name("storage-commits.json") if args.out == "bench/results/storage.json" else Path(args.out)
        result["command"] = f"python -m bench.storage --commit-scaling --commits {args.commits}"
        save_result(result, out)
        return result

    tables = make_tables(args.rows, args.per_shard, args.tokens)
    nbytes = sum(t.nbytes for t in tables)
    print(f"{args.rows:,} rows, {len(tables)} shards, {nbytes / 2**20:,.0f} MiB of Arrow data")
    scratch = Path(args.dir or tempfile.mkdtemp(prefix="pf-bench-"))
    times = {k: [] for k in ("bare_write", "bare_durable_write", "storage_write", "bare_read", "storage_read",
                             "storage_read_unchecked")}
    sides = ["bare", "bare_durable", "storage"]
    try:
        for r in range(args.rounds):
            for side in sides[r % 3:] + sides[:r % 3]:  # each side goes first in turn
                folder = scratch / f"{side}-{r}"
                write = {"bare": bare_write, "bare_durable": bare_write_durable, "storage": storage_write}[side]
                tw, _ = timed(write, folder, tables)
                times[f"{side}_write"].append(tw)
                if side != "bare_durable":
                    tr, (rows, total) = timed(bare_read if side == "bare" else storage_read, folder)
                    assert rows == args.rows, (side, rows)
                    times[f"{side}_read"].append(tr)
                if side == "storage":
                    tu, (rows_u, total_u) = timed(storage_read, folder, False)
                    assert (rows_u, total_u) == (rows, total)
                    times["storage_read_unchecked"].append(tu)
                shutil.rmtree(folder)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}

    def paired(a: str, b: str) -> float:  # the median over rounds of a / b measured in the same round
        ratios = sorted(x / y for x, y in zip(times[a], times[b]))
        return round(ratios[len(ratios) // 2], 3)

    result = {
        "rows": args.rows,
        "shards": len(tables),
        "mib": round(nbytes / 2**20, 1),
        "dir": str(scratch),
        "rows_per_s": {k: round(args.rows / v) for k, v in best.items()},
        # storage/ makes each shard durable (fsync) before it commits it: against bare pyarrow
        # doing the same, and against bare pyarrow leaving its bytes in the page cache
        "write_ratio": round(best["bare_durable_write"] / best["storage_write"], 3),
        "write_ratio_median": paired("bare_durable_write", "storage_write"),
        "write_ratio_page_cache": round(best["bare_write"] / best["storage_write"], 3),
        "write_ratio_page_cache_median": paired("bare_write", "storage_write"),
        "read_ratio": round(best["bare_read"] / best["storage_read"], 3),
        "read_ratio_median": paired("bare_read", "storage_read"),
        "read_ratio_unchecked": round(best["bare_read"] / best["storage_read_unchecked"], 3),
        "read_ratio_unchecked_median": paired("bare_read", "storage_read_unchecked"),
        "load": os.getloadavg(),
        "rounds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python -m bench.storage " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "dir", "commit_scaling", "commits")),
    }
    rps = result["rows_per_s"]
    print(f"write: storage {rps['storage_write']:,} rows/s, bare pyarrow fsynced {rps['bare_durable_write']:,} rows/s, "
          f"ratio {result['write_ratio']:.2f} (best rounds; median of paired rounds {result['write_ratio_median']:.2f})")
    print(f"       against bare pyarrow into the page cache {rps['bare_write']:,} rows/s: "
          f"{result['write_ratio_page_cache']:.2f} ({result['write_ratio_page_cache_median']:.2f})")
    print(f"read:  storage {rps['storage_read']:,} rows/s, bare pyarrow {rps['bare_read']:,} rows/s, "
          f"ratio {result['read_ratio']:.2f} ({result['read_ratio_median']:.2f}); "
          f"without the hash check {result['read_ratio_unchecked']:.2f} ({result['read_ratio_unchecked_median']:.2f})")
    print(f"load average at the end: {result['load']}")
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
