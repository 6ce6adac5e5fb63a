"""Where a decoder looks while it draws a dual panel's lower half, on a tokens dataset.

    python -m tasks.assets.panel_attention --tokens out/held/tokens --decoder assets/decoder-tiny

To draw the lower panel's code at row r, column c from the upper panel (a picture from its canny
map, an edit from its source), a decoder has to read the upper panel's code at the same place:
half a picture back in the sequence. For each dual-panel task this measures, over the lower
panel's codes and for every layer, the attention that the layer's most attentive head gives the
query predicting code (r, c):
- `upper_same_place`: to the upper panel's code at (r, c);
- `row_above`: to the lower panel's own code at (r - 1, c) (rows after the first);
and, of the codes themselves, how many equal the upper panel's code at the same place, with the
decoder's loss (nats) where they do and where they do not. A head that looks at the right place
while the loss stays high says the codes it finds there do not tell it enough.

The attention weights are recomputed from each layer's own input (a forward pre-hook) with the
layer's projections, qk-norm and rotary embedding; the test checks that they give the layer's
output. Printed and saved as JSON (--out).
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from model.decoder import Attention, Decoder, rotate_half
from model.layout import lower_panel_start
from model.prompts import is_dual
from tasks.assets import save_result
from tasks.assets.heldout_loss import token_rows


def attention_weights(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The causal attention probabilities [B, H, T, T] of `attn` on its input x [B, T, dim] (no cache)."""
    b, t, _ = x.shape
    q, k, _ = attn.projections(x)
    q = attn.q_norm(q.view(b, t, attn.n_heads, attn.head_dim))
    k = attn.k_norm(k.view(b, t, attn.n_kv_heads, attn.head_dim))
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    q = (q * cos + rotate_half(q) * sin).transpose(1, 2)
    k = (k * cos + rotate_half(k) * sin).transpose(1, 2)
    k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(attn.head_dim)
    causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
    return scores.masked_fill(causal, float("-inf")).softmax(-1)


def panel_attention(model: Decoder, rows: list[tuple[list[int], int, int, int]]) -> dict:
    """rows: (tokens, loss_start, grid_h, grid_w) of one dual-panel task -> the figures above."""
    inputs: list[tuple] = []
    hooks = [layer.attention.register_forward_pre_hook(lambda m, args: inputs.append((m, args[0], args[1], args[2])))
             for layer in model.layers]
    n_layers, n_heads = model.args.n_layers, model.args.n_heads
    same_place = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    above = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    n_q = n_above = 0
    loss_equal, loss_other = [], []
    try:
        for tokens, start, gh, gw in rows:
            inputs.clear()
            ids = torch.tensor(tokens)
            with torch.inference_mode():
                logp = model(ids[None])[0].float().log_softmax(-1)
                probs = torch.stack([attention_weights(m, x, c, s)[0] for m, x, c, s in inputs])  # [L, H, T, T]
            r = torch.arange(gh // 2).repeat_interleave(gw)  # the lower panel's codes (r, c), raster order
            j = lower_panel_start(start, gh, gw) + r * (gw + 1) + torch.arange(gw).repeat(gh // 2)
            u = j - (gh // 2) * (gw + 1)  # the upper panel's code at the same place
            q = j - 1  # the query that predicts code j
            same_place += probs[:, :, q, u].double().sum(-1)
            above += probs[:, :, q[r > 0], (j - (gw + 1))[r > 0]].double().sum(-1)
            n_q, n_above = n_q + len(j), n_above + int((r > 0).sum())
            nll = (-logp[q, ids[j]]).tolist()
            for equal, v in zip((ids[j] == ids[u]).tolist(), nll):
                (loss_equal if equal else loss_other).append(v)
    finally:
        for h in hooks:
            h.remove()

    def best(acc: torch.Tensor, n: int) -> list[dict]:
        mean = acc / max(n, 1)
        return [{"layer": li, "head": int(mean[li].argmax()), "attention": round(float(mean[li].max()), 4)}
                for li in range(n_layers)]

    return {"rows": len(rows), "codes": n_q,
            "upper_same_place": best(same_place, n_q), "row_above": best(above, n_above),
            "codes_equal_to_upper": round(len(loss_equal) / max(n_q, 1), 4),
            "loss_where_equal": _mean(loss_equal), "loss_where_different": _mean(loss_other)}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def main(argv: list[str] | None = None) -> dict:
    from model.hf_checkpoint import load_decoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", required=True, help="a tokens dataset (folder or URI)")
    ap.add_argument("--decoder", required=True, help="a decoder folder")
    ap.add_argument("--rows", type=int, default=16, help="rows of each dual-panel task (default 16)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="bench/results/decoder-panel-attention.json")
    args = ap.parse_args(argv)
    if args.rows < 1:
        ap.error(f"--rows {args.rows}: measure at least one row of each task")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    by_task: dict[str, list] = {}
    for tokens, start, task, gh, gw in token_rows(args.tokens):
        if is_dual(task) and len(by_task.setdefault(task, [])) < args.rows:
            by_task[task].append((tokens, start, gh, gw))
    model, _ = load_decoder(args.decoder, dtype=torch.float32)
    model.eval()
    result = {"tokens": args.tokens, "decoder": args.decoder, "tasks": {}}
    for task, rows in sorted(by_task.items()):
        fig = result["tasks"][task] = panel_attention(model, rows)
        top = max(fig["upper_same_place"], key=lambda d: d["attention"])
        print(f"{task:14s} {fig['rows']} rows: best head on the upper panel's same place: layer {top['layer']} "
              f"head {top['head']} {top['attention']:.2f}; codes equal to the upper's {fig['codes_equal_to_upper']:.1%}; "
              f"loss where equal {fig['loss_where_equal']}, where different {fig['loss_where_different']}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = (f"python -m tasks.assets.panel_attention --tokens {args.tokens} --decoder {args.decoder} "
                         f"--rows {args.rows}")
    save_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
