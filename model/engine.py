"""The generation engine: batched CFG sampling with SJD on a static KV cache, continuous batching.

    python -m bench.generate --preset tiny --images 8      # CPU figures; --device cuda on a GPU

engine = Engine(model, layout, max_batch=8, device="cuda", compile=True)
for result in engine.generate(requests): ...   # each Result as soon as its image is done

Each of the max_batch slots holds one request in two cache rows: the conditional sequence
(prompt + image) in row b and the unconditional one in row max_batch + b, which starts at the
image-start token (REFERENCE.md, CFG). Every step feeds each slot a window of L tokens (the last
accepted one and L-1 drafts) at its own positions, so rows advance at their own pace; a slot
whose image is done is refilled with the next request (continuous batching). Requests with
sjd=False share the step and keep one token of it. The layout decides what each position may
hold: image codes inside a row, the row end at each row's end, the image end last.

Tasks: text-to-image and a pair from text (upper_codes=None: the whole image is sampled) and
image-to-image (upper_codes given: the upper panel is prefilled, the lower one sampled).
A bad request fails alone, before any work, with Result.error saying what to change.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from model import sampling as S
from model.decoder import Decoder
from model.sjd import force_layout, next_window, verify

FROM_TEXT_TASKS = ("t2i", "pair")
IMAGE_TO_IMAGE_TASKS = ("edit", "subject", "control:*", "dense:*")


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    height: int  # pixels of the whole image (both panels of a dual panel)
    width: int
    upper_codes: np.ndarray | None = None  # [rows / 2, cols] codes of the given upper panel
    seed: int = 0
    cfg: float = 4.0
    temperature: float = 1.0
    top_k: int = 4096
    sjd: bool = True
    window: int = 16  # SJD window; at most the engine's
    task: str | None = None  # optional check: t2i / pair need no upper panel, the others need one


@dataclass
class Result:
    id: str
    codes: np.ndarray | None  # [rows, cols] codebook indices of the whole image
    steps: int = 0
    tokens: int = 0  # tokens generated (codes, row ends, image end)
    seconds: float = 0.0
    error: str | None = None


@dataclass
class _Job:
    request: Request
    context: list[int]  # conditional context: prompt + image prefix (+ upper panel rows)
    rows: int
    cols: int
    started: float


class Engine:
    def __init__(self, model: Decoder, layout, max_batch: int = 8, device: str | torch.device = "cpu",
                 compile: bool = False, window: int = 16, max_seq: int | None = None, kv_bucket: int = 512,
                 cache_dtype: torch.dtype | None = None, compile_backend: str = "inductor"):
        self.model, self.layout, self.device = model, layout, torch.device(device)
        self.max_batch, self.window, self.kv_bucket = max_batch, window, kv_bucket
        self.max_seq = max_seq or model.args.max_seq_len
        self.n_codes = layout.codebook_size
        if self.device.type == "cuda":
            elem = torch.finfo(cache_dtype or model.output.weight.dtype).bits // 8
            need = 2 * max_batch * self.max_seq * model.args.n_layers * 2 * model.args.n_kv_heads * \
                model.args.head_dim * elem
            model.clear_cache()
            free = torch.cuda.mem_get_info(self.device)[0]
            if need > free:
                raise ValueError(f"Engine: a KV cache of {2 * max_batch} rows x {self.max_seq} slots needs "
                                 f"{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free: lower max_batch or "
                                 f"max_seq (the longest prompt + image + window)")
        model.setup_cache(2 * max_batch, self.max_seq, dtype=cache_dtype, device=self.device)
        # The image span only holds codes, row ends and the image end: the head keeps those rows.
        local = list(range(layout.code_offset, layout.code_offset + self.n_codes)) + [layout.row_end,
                                                                                       layout.image_end]
        self.local_to_global = torch.tensor(local, device=self.device)
        with torch.no_grad():
            self.head = model.output.weight[self.local_to_global].detach().clone()
        self._forward = self._decode_logits
        if compile:
            # CUDA graphs of the static-shape step (paper 4.3.2); the tests trace it with "aot_eager"
            mode = "reduce-overhead" if compile_backend == "inductor" else None
            # dynamic=None: the second kv bucket recompiles once with kv_len symbolic, later buckets only
            # record their CUDA graph (a 7B graph takes about a minute to compile, REFERENCE.md)
            self._forward = torch.compile(self._decode_logits, mode=mode, backend=compile_backend, fullgraph=True,
                                          dynamic=None)
        b, L, dev = max_batch, window, self.device
        z = lambda dtype=torch.long: torch.zeros(b, dtype=dtype, device=dev)  # noqa: E731
        self.active, self.speculative = z(torch.bool), z(torch.bool)
        self.pos, self.uoff, self.body0, self.rows, self.cols = z(), z(), z(), z(), z()
        self.seed, self.nstep, self.top_k, self.limit = z(), z(), z(), z()
        self.last_tok = z()
        self.cfg, self.temperature = z(torch.float), z(torch.float)
        self.drafts = torch.zeros(b, L, dtype=torch.long, device=dev)
        self.q = torch.zeros(b, L, self.n_codes + 2, device=dev)
        self.max_body = 0
        self.gen = torch.zeros(b, 1, dtype=torch.long, device=dev)  # local ids by body index, grown on demand
        self.jobs: list[_Job | None] = [None] * b
        self._advance = advance
        if compile:
            # one CUDA graph per kv_len bucket: let dynamo keep them all
            limit = 2 * math.ceil(self.max_seq / kv_bucket) + 8
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
            self._advance = torch.compile(advance, backend=compile_backend, fullgraph=True, dynamic=False)
        self.steps_run = 0

    # --- requests -----------------------------------------------------------------------------
    def check(self, r: Request) -> tuple[list[int], int, int]:
        """Validate a request -> (conditional context, rows, cols); ValueError says what to change."""
        where = f"request {r.id!r}"
        if r.task is not None:
            ok_task = r.task in FROM_TEXT_TASKS + ("edit", "subject") or r.task.startswith(("control:", "dense:"))
            if not ok_task:
                raise ValueError(f"{where}: unknown task {r.task!r}; expected one of "
                                 f"{', '.join(FROM_TEXT_TASKS + IMAGE_TO_IMAGE_TASKS)}")
            if r.task in FROM_TEXT_TASKS and r.upper_codes is not None:
                raise ValueError(f"{where}: task {r.task!r} samples the whole image; drop upper_codes")
            if r.task not in FROM_TEXT_TASKS and r.upper_codes is None:
                raise ValueError(f"{where}: task {r.task!r} is image-to-image; give upper_codes (the upper panel)")
        for what, px in (("height", r.height), ("width", r.width)):
            if not isinstance(px, (int, np.integer)) or px <= 0 or px % 32:
                raise ValueError(f"{where}: {what} {px!r} px is not a positive multiple of 32")
        if not (isinstance(r.top_k, (int, np.integer)) and r.top_k >= 1):
            raise ValueError(f"{where}: top_k {r.top_k!r} must be an integer >= 1 (the release uses 4096)")
        if not r.temperature > 0:
            raise ValueError(f"{where}: temperature {r.temperature!r} must be > 0 (use a small value for greedy)")
        if not r.cfg >= 1.0:
            raise ValueError(f"{where}: cfg {r.cfg!r} is below 1; 1 turns guidance off, the release uses 4.0")
        if not (isinstance(r.window, (int, np.integer)) and r.window >= 1):
            raise ValueError(f"{where}: window {r.window!r} must be an integer >= 1 (the release uses 16)")
        ids = np.asarray(r.prompt_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{where}: prompt_ids must be a non-empty list of token ids")
        if ids.min() < 0 or ids.max() >= self.model.args.vocab_size:
            raise ValueError(f"{where}: prompt_ids hold ids outside 0..{self.model.args.vocab_size - 1}")
        rows, cols = r.height // self.layout.patch, r.width // self.layout.patch
        total = len(ids) + 3 + rows * (cols + 1) + 1
        if total + self.window > self.max_seq:
            raise ValueError(f"{where}: {r.width}x{r.height} px with a {len(ids)}-token prompt needs {total} "
                             f"positions (+{self.window} for the window); the context holds {self.max_seq}: "
                             f"use a smaller image or a shorter prompt")
        try:
            prefix = list(self.layout.image_prefix(r.height, r.width))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        context = [int(i) for i in ids] + prefix
        if r.upper_codes is not None:
            up = np.asarray(r.upper_codes)
            if up.shape != (rows // 2, cols):
                raise ValueError(f"{where}: upper_codes of shape {up.shape}; a {r.width}x{r.height} image's "
                                 f"upper panel is ({rows // 2}, {cols}) codes")
            if not np.issubdtype(up.dtype, np.integer) or up.min() < 0 or up.max() >= self.n_codes:
                raise ValueError(f"{where}: upper_codes must be integer codes in 0..{self.n_codes - 1}")
            grid = np.concatenate([up.astype(np.int64) + self.layout.code_offset,
                                   np.full((rows // 2, 1), self.layout.row_end)], axis=1)
            context += grid.reshape(-1).tolist()
        return context, rows, cols

    def _prefill(self, new: list[tuple[int, _Job]]) -> None:
        """One forward over the new requests' contexts (cond and uncond rows, right-padded).

        All but the last context token go in; the first step feeds that one. Padding writes slots
        above each row's position, which the mask hides until the row overwrites them.
        """
        seqs, rows = [], []
        for b, job in new:
            n_prompt = len(job.request.prompt_ids)
            seqs += [job.context[:-1], job.context[n_prompt:-1]]
            rows += [b, self.max_batch + b]
        n = max(len(s) for s in seqs)
        tokens = torch.tensor([s + [0] * (n - len(s)) for s in seqs], device=self.device)
        pos = torch.arange(n, device=self.device).expand(len(seqs), n)
        kv_len = min(self.max_seq, math.ceil(n / self.kv_bucket) * self.kv_bucket)
        with torch.no_grad():
            self.model(tokens, pos, return_hidden=True, rows=torch.tensor(rows, device=self.device), kv_len=kv_len)
        for b, job in new:
            self._start(b, job)

    def _start(self, b: int, job: _Job) -> None:
        r, ctx, dev = job.request, job.context, self.device
        n_prompt = len(r.prompt_ids)
        cond = torch.tensor(ctx, device=dev)
        n_body = job.rows * (job.cols + 1) + 1
        if n_body + self.window > self.gen.shape[1]:
            grown = torch.zeros(self.max_batch, n_body + self.window, dtype=torch.long, device=dev)
            grown[:, :self.gen.shape[1]] = self.gen
            self.gen = grown
        done_body = len(ctx) - (n_prompt + 3)  # the upper panel, already in place
        if done_body:
            body = cond[n_prompt + 3:] - self.layout.code_offset
            body[body == self.layout.row_end - self.layout.code_offset] = self.n_codes
            self.gen[b, :done_body] = body
        self.pos[b], self.uoff[b], self.body0[b] = len(ctx) - 1, n_prompt, n_prompt + 3
        self.rows[b], self.cols[b], self.last_tok[b] = job.rows, job.cols, ctx[-1]
        self.seed[b], self.nstep[b], self.top_k[b] = r.seed, 0, min(r.top_k, self.n_codes)
        self.cfg[b], self.temperature[b] = r.cfg, r.temperature
        self.speculative[b], self.limit[b], self.active[b] = bool(r.sjd), min(r.window, self.window), True
        one = torch.tensor([b], device=dev)
        rand = self._random_drafts(self.seed[one], self.nstep[one] - 1)
        kind = S.position_kinds(self._body_index(one) + 1, self.rows[one], self.cols[one])
        d, q = force_layout(rand, F.one_hot(rand, self.n_codes + 2).float(), kind, self.n_codes)
        self.drafts[b], self.q[b] = d[0], q[0]
        self.jobs[b] = job

    def _random_drafts(self, seed, step):
        return random_drafts(seed, step, self.window, self.n_codes)

    def _body_index(self, slots):
        """Body index of each window input position [n, L] (the window predicts index + 1)."""
        return self.pos[slots, None] - self.body0[slots, None] + torch.arange(self.window, device=self.device)

    # --- the step -----------------------------------------------------------------------------
    def _decode_logits(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        h = self.model(tokens, input_pos, return_hidden=True, kv_len=kv_len)
        return F.linear(h, self.head.to(h.dtype)).float()

    @torch.no_grad()
    def step(self) -> None:
        """One forward of every slot's window, then verify / sample / carry over, per slot."""
        b, L, dev = self.max_batch, self.window, self.device
        act = self.active
        offs = torch.arange(L, device=dev)
        pos_c = torch.where(act, self.pos, 0)[:, None] + offs
        pos_u = torch.where(act, self.pos - self.uoff, 0)[:, None] + offs
        window_tokens = torch.cat([self.last_tok[:, None], self.local_to_global[self.drafts[:, :L - 1]]], 1)
        window_tokens = torch.where(act[:, None], window_tokens, 0)
        top = int(pos_c.max()) + 1
        kv_len = min(self.max_seq, math.ceil(top / self.kv_bucket) * self.kv_bucket)
        logits = self._forward(torch.cat([window_tokens, window_tokens]), torch.cat([pos_c, pos_u]), kv_len)
        tokens, gained, drafts, q = self._advance(
            logits, self.pos, self.body0, self.rows, self.cols, self.cfg, self.temperature, self.top_k, self.limit,
            self.speculative, self.seed, self.nstep, self.drafts, self.q)

        # Write the kept tokens by body index; move each row forward by what it gained.
        body_idx = (self.pos - self.body0 + 1)[:, None] + offs
        keep = (offs[None] < gained[:, None]) & act[:, None]
        cur = self.gen.gather(1, body_idx.clamp(min=0))
        self.gen.scatter_(1, body_idx.clamp(min=0), torch.where(keep, tokens, cur))
        last = tokens.gather(1, (gained - 1).clamp(min=0)[:, None])[:, 0]
        self.last_tok = torch.where(act, self.local_to_global[last], self.last_tok)
        self.pos = torch.where(act, self.pos + gained, self.pos)
        self.nstep = self.nstep + act.long()
        self.drafts = torch.where(act[:, None], drafts, self.drafts)
        self.q = torch.where(act[:, None, None], q, self.q)
        self.steps_run += 1

    # --- the loop -----------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> Iterator[Result]:
        """Yield a Result per request, each as soon as it is done (bad requests at once)."""
        pending = iter(requests)
        exhausted = False
        while True:
            new = []
            for b in range(self.max_batch):
                while self.jobs[b] is None and not exhausted:
                    r = next(pending, None)
                    if r is None:
                        exhausted = True
                        break
                    t0 = time.perf_counter()
                    try:
                        ctx, rows, cols = self.check(r)
                    except ValueError as e:
                        yield Result(id=r.id, codes=None, seconds=time.perf_counter() - t0, error=str(e))
                        continue
                    self.jobs[b] = _Job(r, ctx, rows, cols, t0)
                    new.append((b, self.jobs[b]))
            if new:
                self._prefill(new)
            if not any(j is not None for j in self.jobs):
                return
            self.step()
            end = self.body0 + self.rows * (self.cols + 1)
            done = (self.active & (self.pos >= end)).tolist()
            for b, finished in enumerate(done):
                if finished:
                    yield self._finish(b)

    def _finish(self, b: int) -> Result:
        job = self.jobs[b]
        self.jobs[b] = None
        self.active[b] = False
        n_body = job.rows * (job.cols + 1) + 1
        local = self.gen[b, :n_body]
        ids = self.local_to_global[local].tolist()
        prefix = job.context[len(job.request.prompt_ids):][:3]
        codes = np.asarray(self.layout.parse_image(prefix + ids))  # also checks the layout held
        done_before = len(job.context) - len(job.request.prompt_ids) - 3
        return Result(id=job.request.id, codes=codes, steps=int(self.nstep[b]), tokens=n_body - done_before,
                      seconds=time.perf_counter() - job.started)


def advance(logits, pos, body0, rows, cols, cfg, temperature, top_k, window, speculative, seed, nstep, drafts, q):
    """Everything of a step after the forward, as one pure function (compiled on GPUs).

    logits [2B, L, C+2] (cond rows, then uncond rows) -> (tokens [B, L] local ids valid up to
    gained, gained [B], next drafts [B, L] and their q [B, L, C+2], both layout-forced).
    """
    b, length = drafts.shape
    n_codes = q.shape[-1] - 2
    offs = torch.arange(length, device=drafts.device)
    guided = S.cfg_mix(logits[:b], logits[b:], cfg)
    body_next = (pos - body0)[:, None] + offs + 1  # body index each window position predicts
    kind = S.position_kinds(body_next, rows, cols)
    p = S.probs_from_logits(guided, S.allowed_local(kind, n_codes), temperature, top_k)
    end = body0 + rows * (cols + 1)  # position of the image end
    limit = torch.minimum(window, (end - pos).clamp(min=1))
    idx = offs.expand(b, length)
    u_acc = S.counter_uniform(seed, nstep, idx, S.STREAM_ACCEPT)
    u_res = S.counter_uniform(seed, nstep, offs[:1].expand(b, 1), S.STREAM_RESIDUAL)[:, 0]
    tokens, gained = verify(p, drafts, q, u_acc, u_res, limit, speculative)
    fresh = S.sample(p, S.counter_uniform(seed, nstep, idx, S.STREAM_FRESH))
    random = random_drafts(seed, nstep, length, n_codes)
    new_drafts, new_q = next_window(p, fresh, gained, random)
    kind_next = S.position_kinds(body_next + gained[:, None], rows, cols)
    new_drafts, new_q = force_layout(new_drafts, new_q, kind_next, n_codes)
    return tokens, gained, new_drafts, new_q


def random_drafts(seed, step, length: int, n_codes: int):
    """Uniformly random codes (local ids) to refill a window: SJD's initial drafts."""
    u = S.counter_uniform(seed, step, torch.arange(length, device=seed.device), S.STREAM_DRAFT)
    return (u * n_codes).long().clamp(max=n_codes - 1)
