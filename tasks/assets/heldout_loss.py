"""Held-out loss of decoders on a tokens dataset they were not trained on, side by side.

    python -m tasks.assets.heldout_loss --tokens out/held/tokens --decoder assets/decoder-tiny \
        --decoder out/assets/runs/decoder-tiny-4/shapes-128/export

The figure is the one training logs (cross-entropy per supervised token: the image tokens after
each row's loss_start, docs/train.md), computed without dropout or cfg dropping on every row of
the dataset (or the first --rows), the same rows and batches for each decoder, overall and for
each task kind (rows are batched within their task, so the two agree to rounding). Training's own loss
is on rows it has seen, often many times; this one says whether a decoder draws unseen scenes
better (docs/assets.md). Results are printed and saved as JSON (--out).

For the dual-panel kinds each task's figure is also split by panel: `upper` (the image prefix and
the upper panel's rows: the control map of control:*, the picture of dense:*) and `lower` (the
lower panel's rows, then image_end and turn_end). The lower panel of a control row, given its map,
costs what the picture costs once the map is known: beside t2i's loss it says how much the
decoder takes from the map. The split is exact (cross-entropy sums add up): `lower` is the loss
with supervision starting at the lower panel's first row, `upper` the rest. With --swap-maps,
`lower_other_map` is the lower panel's loss when each row's upper panel is another row's (same
task, same length) and `map_worth` what the row's own upper panel saves a code: near 0, the
decoder draws the lower panel without reading the map.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from model.hf_checkpoint import load_decoder
from model.layout import lower_panel_start
from model.prompts import is_dual
from model.training import chunked_loss, make_batch
from storage import open_dataset
from tasks.assets import save_result


def heldout_loss(model, samples: list[tuple[list[int], int]], batch_size: int = 8) -> tuple[float, int]:
    """(cross-entropy per supervised token, supervised tokens) of model over samples."""
    ce_sum, n_sum = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(samples), batch_size):
            batch = make_batch(samples[i:i + batch_size])
            hidden = model(batch.inputs, return_hidden=True)
            ce, _, n = chunked_loss(hidden.float(), batch.labels, model.output, recompute=False)
            ce_sum += float(ce)
            n_sum += n
    return ce_sum / n_sum, n_sum


def token_rows(tokens: str, limit: int | None = None) -> list[tuple[list[int], int, str, int, int]]:
    """(tokens, loss_start, task, grid_h, grid_w) of a tokens dataset's rows, the first `limit` or all."""
    ds = open_dataset(tokens)
    n = len(ds) if limit is None else min(limit, len(ds))
    table = ds.take(list(range(n)), columns=["tokens", "loss_start", "task", "grid_h", "grid_w"])
    return list(zip(*(table.column(c).to_pylist() for c in table.column_names)))


def panel_split(model, samples: list[tuple[list[int], int]], lowers: list[int], total: tuple[float, int],
                batch_size: int = 8) -> dict:
    """{"upper": {loss, supervised_tokens}, "lower": {...}} from the whole rows' (mean CE, tokens)."""
    ce_low, n_low = heldout_loss(model, [(ids, lo) for (ids, _), lo in zip(samples, lowers)], batch_size)
    ce_up, n_up = total[0] * total[1] - ce_low * n_low, total[1] - n_low
    return {"upper": {"loss": round(ce_up / n_up, 4), "supervised_tokens": n_up},
            "lower": {"loss": round(ce_low, 4), "supervised_tokens": n_low}}


def swap_upper(samples: list[tuple[list[int], int]], lowers: list[int]) -> list[tuple[list[int], int]]:
    """Each dual-panel row with the upper panel of another row of the same task (the next one with
    an upper span of the same length, in turn): its own prompt and lower panel, someone else's map.
    Supervision starts at the lower panel; a row alone in its length is left out."""
    groups: dict[int, list[int]] = {}
    for i, ((_, start), lo) in enumerate(zip(samples, lowers)):
        groups.setdefault(lo - start, []).append(i)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        for k, i in enumerate(members):
            j = members[(k + 1) % len(members)]
            (ids, start), lo = samples[i], lowers[i]
            (other, o_start), o_lo = samples[j], lowers[j]
            out.append((ids[:start] + other[o_start:o_lo] + ids[lo:], lo))
    return out


def panel_text(panel: dict | None) -> str:
    """' (upper U, lower L[, lower under another map O])' of a task's panel figures; '' for none."""
    if not panel:
        return ""
    other = f", lower under another map {panel['lower_other_map']['loss']:.3f}" if "lower_other_map" in panel else ""
    return f" (upper {panel['upper']['loss']:.3f}, lower {panel['lower']['loss']:.3f}{other})"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", required=True, help="a tokens dataset (folder or URI) the decoders did not train on")
    ap.add_argument("--decoder", action="append", required=True, help="a decoder folder; give it once per decoder")
    ap.add_argument("--rows", type=int, default=None, help="the first N rows only (default: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-panels", dest="panels", action="store_false",
                    help="skip the split of dual-panel rows into upper and lower panel (a second pass over them)")
    ap.add_argument("--swap-maps", action="store_true",
                    help="also the lower panel's loss under another row's upper panel (map): what the right one is worth")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/decoder-heldout-loss.json")
    args = ap.parse_args(argv)
    if args.swap_maps and not args.panels:
        ap.error("--swap-maps measures the lower panel: it cannot go with --no-panels")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = token_rows(args.tokens, args.rows)
    n = len(rows)
    by_task: dict[str, list[tuple[list[int], int]]] = {}
    lowers: dict[str, list[int]] = {}
    for tokens, start, task, gh, gw in rows:
        by_task.setdefault(task, []).append((tokens, start))
        if is_dual(task):
            lowers.setdefault(task, []).append(lower_panel_start(start, gh, gw))
    print(f"{args.tokens}: {n} rows, " + ", ".join(f"{t} {len(s)}" for t, s in sorted(by_task.items())))
    result = {"tokens": args.tokens, "rows": n, "decoders": {}}
    for folder in args.decoder:
        t = time.perf_counter()
        model, _ = load_decoder(folder, dtype=torch.float32)
        tasks = {task: heldout_loss(model, s, args.batch_size) for task, s in sorted(by_task.items())}
        tokens = sum(k for _, k in tasks.values())
        loss = sum(ce * k for ce, k in tasks.values()) / tokens
        panels = {task: panel_split(model, by_task[task], lowers[task], tasks[task], args.batch_size)
                  for task in lowers} if args.panels else {}
        if args.panels and args.swap_maps:
            for task in lowers:
                swapped = swap_upper(by_task[task], lowers[task])
                if swapped:
                    ce, k = heldout_loss(model, swapped, args.batch_size)
                    panels[task]["lower_other_map"] = {"loss": round(ce, 4), "supervised_tokens": k}
                    panels[task]["map_worth"] = round(ce - panels[task]["lower"]["loss"], 4)
        result["decoders"][folder] = {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 3),
                                      "supervised_tokens": tokens, "seconds": round(time.perf_counter() - t, 1),
                                      "by_task": {task: {"loss": round(ce, 4), "supervised_tokens": k,
                                                         **panels.get(task, {})}
                                                  for task, (ce, k) in tasks.items()}}
        print(f"{folder}: held-out loss {loss:.4f} (perplexity {math.exp(loss):.2f}) over {tokens:,} tokens; "
              + ", ".join(f"{task} {ce:.3f}" + panel_text(panels.get(task)) for task, (ce, _) in tasks.items()))
        del model
    result["command"] = "python -m tasks.assets.heldout_loss " + " ".join(
        [f"--tokens {args.tokens}"] + [f"--decoder {d}" for d in args.decoder]
        + ([f"--rows {args.rows}"] if args.rows else []) + ([] if args.panels else ["--no-panels"])
        + (["--swap-maps"] if args.swap_maps else []))
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
