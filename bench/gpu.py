"""Every GPU check and figure in one command (issue 13): one table printed, one JSON written.

    python -m bench.gpu                                       # one H100/H200: within 8.5 minutes
    python -m bench.gpu --device cpu --preset tiny --quick    # a CPU: every part at tiny size, < 2 minutes
    python -m bench.gpu --parts correctness,static,bulk       # some parts only

Parts, each with a time budget (compiles dominate: about a minute each at 7b):
- correctness: the compiled engine against the eager one on the tiny preset, fp32, same seeds,
  without and with a draft tree:
  identical codes and steps (t2i and image-to-image, SJD on and off); int4 (int8 on a CPU) on
  the tiny preset runs;
- reference, static, int4, int4-sjd: the 7b at 768 px with CFG at three contexts (bench/generate.py):
  the release's loop, the engine in bf16, int4 weight-only, int4 + SJD; seconds per image at the
  SJD acceptance measured on the shipped tiny decoder (bench/results/generate-sjd-acceptance-tiny.json);
- bulk: int4 + SJD at the largest batch that fits (Engine.fit_batch), images per hour;
- train: 2b training at 256 and 768 px, tokens/s and MFU (bench/train.py);
- tokenize: MoVQGAN-270M encoding at 768 px, images/s (bench/tokenize.py).
The parts run one after another in a worker process; a part past its budget is stopped there,
the table says so, and the next part gets a fresh worker. Imports model/ and bench/ only (no Ray,
Prefect or pydantic: a bare GPU machine has torch, and torchao from its wheel). Writes
bench/results/gpu-<device>.json (or --out).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import save_result

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Plan:
    """What the parts run: the full GPU plan, or the tiny one that checks the command on a CPU."""

    device: str
    preset: str  # the decoder of the generation parts
    size: int  # image side in px
    steps: int  # timed decode steps per context
    train_preset: str
    train_px: tuple[int, ...]
    train_tokens: int
    train_steps: int
    movqgan: str
    movqgan_px: int
    movqgan_images: tuple[int, int, int]  # per-image loop, batched, batch
    compile_backend: str  # the correctness part's; the figures use inductor on CUDA
    threads: int | None = None  # torch intra-op threads of the worker (None: torch's default)


def make_plan(device: str, preset: str | None, quick: bool, threads: int | None = None) -> Plan:
    if quick:
        return Plan(device, preset or "tiny", 64, 2, "tiny", (64,), 512, 1, "tiny", 64, (2, 4, 4),
                    "inductor" if device == "cuda" else "aot_eager", threads)
    return Plan(device, preset or "7b", 768, 8, "2b", (256, 768), 18000, 4, "270m", 768, (4, 32, 16), "inductor",
                threads)


# --- the parts ------------------------------------------------------------------------------------

def part_correctness(plan: Plan) -> dict:
    """Compiled vs eager engine on the tiny preset in fp32, same requests and seeds: the codes and
    step counts must be identical, without and with a 2x2 draft tree; then the tiny preset int4
    (int8 on a CPU) generates."""
    import numpy as np
    import torch

    from bench.generate import BenchLayout, build_model
    from model.decoder import ModelArgs
    from model.engine import Engine, Request
    from model.quantize import quantize_decoder
    from model.sjd import DRAFT_KINDS

    device = torch.device(plan.device)
    layout = BenchLayout("tiny")
    args = ModelArgs.from_name("tiny", vocab_size=layout.vocab_size, max_seq_len=512)
    rng = np.random.default_rng(0)
    requests = []
    for i in range(len(DRAFT_KINDS) + 1):  # t2i and image-to-image, every SJD draft kind, and one without SJD
        upper = rng.integers(0, layout.codebook_size, (4, 8)) if i % 2 else None
        requests.append(Request(f"r{i}", [layout.bos, 7 + i, 8, layout.turn_end], 64, 64, upper_codes=upper,
                                seed=i, top_k=64, sjd=i < len(DRAFT_KINDS), window=8,
                                drafts=DRAFT_KINDS[i % len(DRAFT_KINDS)]))

    def run(compile: bool, quantize: str = "none", tree: tuple[int, int] = (0, 0)):
        model = build_model(args, device, torch.float32)
        quantize_decoder(model, quantize)
        engine = Engine(model, layout, max_batch=2, device=device, compile=compile, window=8, kv_bucket=64,
                        compile_backend=plan.compile_backend, tree_siblings=tree[0], tree_branch=tree[1])
        out = {r.id: r for r in engine.generate(iter(requests))}
        return out, engine.compile_mode

    t0 = time.perf_counter()
    eager, _ = run(False)
    t_eager = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled, mode = run(True)
    t_compiled = time.perf_counter() - t0
    # the draft tree's step (docs/generate.md, "Draft tree"): its own forward and advance() compiled
    tree_eager, _ = run(False, tree=(2, 2))
    tree_compiled, tree_mode = run(True, tree=(2, 2))
    runs = [eager, compiled, tree_eager, tree_compiled]
    errors = [r.error for out in runs for r in out.values() if r.error]
    if errors:
        raise RuntimeError(f"engine errors: {errors}")

    def identical(a, b):
        return all(np.array_equal(a[k].codes, b[k].codes) and a[k].steps == b[k].steps for k in a)

    same, tree_same = identical(eager, compiled), identical(tree_eager, tree_compiled)
    quant = "int4" if device.type == "cuda" else "int8"
    q, _ = run(False, quant)
    q_ok = all(r.error is None and r.codes is not None for r in q.values())
    return {"ok": bool(same and tree_same and q_ok and mode == tree_mode == "full"), "identical": bool(same),
            "compile_mode": mode, "tree_identical": bool(tree_same), "tree_compile_mode": tree_mode,
            "backend": plan.compile_backend, "requests": len(requests), quant + "_runs": bool(q_ok),
            "eager_s": round(t_eager, 2), "compiled_s": round(t_compiled, 2),
            "summary": f"compiled ({mode}, {plan.compile_backend}) {'==' if same else '!='} eager on "
                       f"{len(requests)} requests, with a 2x2 draft tree ({tree_mode}) "
                       f"{'==' if tree_same else '!='}; {quant} tiny {'runs' if q_ok else 'FAILS'}"}


def _generate_part(setup: str) -> Callable[[Plan], dict]:
    def part(plan: Plan) -> dict:
        from bench.generate import options, run

        n_img = (plan.size // 8) * (plan.size // 8 + 1) + 1
        contexts = f"64,{64 + n_img // 2},{64 + n_img - 8}"  # the image's start, middle and end
        res = run(options(preset=plan.preset, device=plan.device, size=plan.size, contexts=contexts, setups=setup,
                          steps=plan.steps))
        ran = setup if plan.device == "cuda" else setup.replace("int4", "int8")  # no int4 kernel on a CPU
        got = res["setups"].get(ran)
        if got is None:
            raise RuntimeError(f"bench.generate returned no {ran!r} figures")
        out = {"setup": ran, "contexts": res["contexts"], "acceptance_tokens_per_step": res["acceptance_tokens_per_step"],
               "acceptance_from": res["acceptance_from"], **got}
        if setup == "bulk":
            out["summary"] = (f"batch {got['batch']} (fit_batch): {got['ms_per_step']:.1f} ms/step, "
                              f"{got['images_per_hour']:.0f} images/hour (floor {got['floor_images_per_hour']:.0f})")
        else:
            ms = "/".join(f"{m:.1f}" for m in got["ms_per_step"])
            out["summary"] = (f"ms/step {ms} at ctx {'/'.join(str(c) for c in res['contexts'])}; "
                              f"{got['s_per_image']:.1f} s/image (floor {got['floor_s_per_image']:.1f})")
            if "sjd" in setup:
                out["summary"] += f" at {got['tokens_per_step']:.2f} tokens/step"
        if "compile_mode" in got:
            out["summary"] += f"; compile {got['compile_mode']}"
        if ran != setup:
            out["summary"] = f"[{ran}] " + out["summary"]
        return out

    part.__doc__ = f"bench.generate's {setup!r} setup at three contexts"
    return part


def part_train(plan: Plan) -> dict:
    """2b training tokens/s and MFU (bench.train.run; its figures, whatever else it grows)."""
    import bench.train as bt

    res = call_train(bt, plan)
    rows = res.get("rows", [])
    return {**res, "summary": "; ".join(f"{r['px']} px: {r['tokens_per_s']:.0f} tok/s, MFU {r['mfu']:.1%}"
                                        for r in rows)}


def call_train(bt, plan: Plan) -> dict:
    """bench.train's entry point, called by keyword so that added options keep their defaults."""
    import os
    import socket

    import torch.distributed as dist

    if "MASTER_PORT" not in os.environ:  # its fixed default may be taken (another bench.train on this host)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    try:
        return bt.run(preset=plan.train_preset, pxs=list(plan.train_px), tokens_per_step=plan.train_tokens,
                      steps=plan.train_steps, warmup=1, compile=plan.device == "cuda")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def part_tokenize(plan: Plan) -> dict:
    """MoVQGAN encoding images/s (bench.tokenize.bench_encoder)."""
    import bench.tokenize as btok

    rows = call_tokenize(btok, plan)
    return {"rows": rows, "summary": "; ".join(
        f"{r['size']} px: loop {r['loop_img_s']:.1f} img/s, batched {r['batched_img_s']:.1f} img/s "
        f"({r['batched_tflops']:.0f} TFLOP/s)" for r in rows)}


def call_tokenize(btok, plan: Plan) -> list[dict]:
    return btok.bench_encoder(plan.device, [plan.movqgan_px], plan.movqgan, plan.device == "cuda",
                              {plan.movqgan_px: plan.movqgan_images})


# name -> (function, budget in seconds on a GPU, on a CPU with --quick)
PARTS: dict[str, tuple[Callable[[Plan], dict], float, float]] = {
    "correctness": (part_correctness, 90, 60),
    "reference": (_generate_part("reference"), 30, 20),
    "static": (_generate_part("static"), 70, 20),
    "int4": (_generate_part("int4"), 70, 20),
    "int4-sjd": (_generate_part("int4-sjd"), 70, 20),
    "bulk": (_generate_part("bulk"), 75, 20),
    "train": (part_train, 60, 30),
    "tokenize": (part_tokenize, 40, 20),
}


# --- running parts under a budget ---------------------------------------------------------------

def _worker(conn) -> None:
    """Runs the parts the parent sends, one at a time, answering each with its result."""
    import torch  # noqa: F401  (start-up is not a part's time: imported, then ready)

    import bench.generate  # noqa: F401
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        name, plan = msg
        if plan.threads:
            import torch

            torch.set_num_threads(plan.threads)
        t0 = time.perf_counter()
        try:
            out = {"status": "ok", **PARTS[name][0](plan)}
        except (Exception, SystemExit) as e:  # a failing part is a row of the table, not the end of the run
            tb = traceback.format_exc(limit=-3)
            out = {"status": "error", "detail": f"{type(e).__name__}: {str(e)[:400]}", "traceback": tb}
        out["seconds"] = round(time.perf_counter() - t0, 1)
        _free_memory()
        conn.send(out)


def _free_memory() -> None:
    import gc

    import torch

    try:
        torch._dynamo.reset()  # compiled graphs and their CUDA-graph pools
    except Exception:
        pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Runner:
    """One worker process, reused while parts finish within their budget, replaced after a kill."""

    def __init__(self):
        self.ctx = mp.get_context("spawn")  # never fork a process that holds CUDA
        self.proc = self.conn = None

    def run(self, name: str, plan: Plan, budget: float) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self.conn, child = self.ctx.Pipe()
            self.proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
            self.proc.start()
            if self.conn.poll(300):  # imports done (else the part's own wait below reports it)
                self.conn.recv()
        t0 = time.perf_counter()
        self.conn.send((name, plan))
        if self.conn.poll(budget):
            try:
                return self.conn.recv()
            except EOFError:  # the worker died (out of host memory, a crash in a kernel)
                self.proc.join()
                code, self.proc = self.proc.exitcode, None
                return {"status": "error", "detail": f"the worker process died (exit code {code})",
                        "seconds": round(time.perf_counter() - t0, 1)}
        self.stop(kill=True)
        return {"status": "skipped", "detail": f"past its {budget:g} s budget", "seconds": round(budget, 1)}

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.conn.send(None)
        self.proc.join(timeout=30)
        self.proc = None


def run_parts(plan: Plan, names: list[str], total_budget: float, scale: float, quick: bool) -> dict:
    started = time.perf_counter()
    runner = Runner()
    parts: dict[str, dict] = {}
    try:
        for name in names:
            budget = PARTS[name][2 if quick else 1] * scale
            left = total_budget - (time.perf_counter() - started)
            if left < min(budget, 10):
                parts[name] = {"status": "skipped", "detail": f"not reached within the {total_budget:.0f} s total",
                               "seconds": 0.0, "budget_s": budget}
                continue
            budget = min(budget, left)
            print(f"== {name} (budget {budget:.0f} s)", flush=True)
            parts[name] = {**runner.run(name, plan, budget), "budget_s": round(budget, 1)}
            print(f"== {name}: {parts[name]['status']} in {parts[name]['seconds']} s", flush=True)
    finally:
        runner.stop()
    add_ratios(parts)
    return parts


def add_ratios(parts: dict) -> None:
    """Per image, each engine setup against the reference loop of the same run (issue 13's goals:
    30x without SJD, 60x with it)."""
    ref = parts.get("reference", {}).get("s_per_image")
    for name in ("static", "int4", "int4-sjd"):
        got = parts.get(name, {})
        if ref and got.get("s_per_image"):
            got["x_reference"] = round(ref / got["s_per_image"], 2)
            got["summary"] += f"; {got['x_reference']}x the reference"


def table(parts: dict) -> str:
    lines = [f"{'part':<12} {'status':<8} {'s (budget)':>11}  result", "-" * 100]
    for name, p in parts.items():
        text = p.get("summary") if p["status"] == "ok" else p.get("detail", "")
        lines.append(f"{name:<12} {p['status']:<8} {p['seconds']:>5.0f} ({p['budget_s']:>3.0f})  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", help="decoder of the generation parts (default 7b; tiny with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes everywhere: checks the command itself")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--total", type=float, default=None, help="seconds for the whole run (default 500; 115 quick)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's budget")
    ap.add_argument("--out", help="JSON path (default bench/results/gpu-<device>.json)")
    ap.add_argument("--threads", type=int, help="torch threads of the parts (on a shared CPU: 1)")
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.parts.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown}; expected some of {', '.join(PARTS)}")
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here; use --device cpu --preset tiny --quick to check the command")
    plan = make_plan(a.device, a.preset, a.quick, a.threads)
    total = a.total or (115 if a.quick else 500)
    t0 = time.perf_counter()
    parts = run_parts(plan, names, total, a.budget_scale, a.quick)
    wall = time.perf_counter() - t0
    name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"\n# bench.gpu on {name} ({a.device}), plan {plan.preset} {plan.size} px, {wall:.0f} s")
    print(table(parts))
    device_tag = torch.device(a.device).type
    out = Path(a.out) if a.out else RESULTS / f"gpu-{device_tag}{'-quick' if a.quick else ''}.json"
    result = {"bench": "gpu", "device": a.device, "device_name": name, "torch": torch.__version__,
              "python": platform.python_version(), "plan": plan.__dict__, "seconds": round(wall, 1),
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "parts": parts}
    save_result(result, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
