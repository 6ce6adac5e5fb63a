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

Draft tree (tree_siblings=S, tree_branch=m; default none): each step also feeds S sibling branches
of m nodes for the window's first position, past the window in the cache (_tree_logits), verifies
them with tree_advance() and moves an accepted branch's K/V to its positions' slots
(move_tree_kv); after a drawn first token the carry-over weights the tree's contexts by the drawn
code's resemblance to each candidate (tree_carry_tau; None: the plain mean). model/sjd.py, "Draft
tree", and docs/generate.md say why it is lossless and what it gains and costs.

Tasks: text-to-image and a pair from text (upper_codes=None: the whole image is sampled) and
image-to-image (upper_codes given: the upper panel is prefilled, the lower one sampled).
A bad request fails alone, before any work, with Result.error saying what to change.

Memory: Engine.fit_batch() is the one place that sizes a batch (KV cache + step workspace against
free memory, with a margin); the engine checks its own max_batch with it. The prefill goes in
chunks of at most prefill_tokens tokens per forward. compile=True compiles the forward and the
sampling half (advance()); a compile failure at any call falls back, with one warning, to the
compiled forward with an eager advance(), then to eager: engine.compile_mode says what ran.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from model import sampling as S
from model.decoder import Decoder
from model.sjd import (CARRY_TAU, DEFAULT_DRAFTS, DRAFT_KINDS, above_in_window, accept_first_of, carry_weights,
                       continue_window, force_layout, in_window_above, is_pac, next_window, refill,
                       tree_candidates, tree_carry, tree_layout, tree_mask, tree_path, verify)

log = logging.getLogger(__name__)

FROM_TEXT_TASKS = ("t2i", "pair")
IMAGE_TO_IMAGE_TASKS = ("edit", "subject", "control:*", "dense:*")


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    height: int  # pixels of the whole image (both panels of a dual panel)
    width: int
    upper_codes: np.ndarray | None = None  # [rows / 2, cols] codes of the given upper panel
    # The upper panel the unconditional (CFG) row sees; None: upper_codes, so guidance amplifies
    # the text alone. A neutral panel (an empty map) makes guidance amplify the map as well.
    uncond_upper_codes: np.ndarray | None = None
    seed: int = 0
    cfg: float = 4.0
    temperature: float = 1.0
    top_k: int = 4096
    min_p: float = 0.0  # keep ids with at least min_p x the largest probability (0: all; model/sampling.py)
    sjd: bool = True
    window: int = 16  # SJD window; at most the engine's
    task: str | None = None  # optional check: t2i / pair need no upper panel, the others need one
    drafts: str = DEFAULT_DRAFTS  # SJD draft initialisation, one of model.sjd.DRAFT_KINDS


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


class Slots(NamedTuple):
    """The engine's per-slot state, one tensor [max_batch, ...] per field, passed to advance() by
    name (a NamedTuple of tensors compiles: a swapped argument cannot pass silently)."""
    active: torch.Tensor  # bool: the slot holds a request
    speculative: torch.Tensor  # bool: SJD on (off: one token a step from p)
    pos: torch.Tensor  # position of the last accepted token (cond row)
    uoff: torch.Tensor  # cond position - uncond position (the prompt's length)
    body0: torch.Tensor  # position of the image's first code
    rows: torch.Tensor  # code grid of the image
    cols: torch.Tensor
    seed: torch.Tensor  # the request's seed (the key of its counter-based draws)
    nstep: torch.Tensor  # the request's steps so far
    top_k: torch.Tensor
    min_p: torch.Tensor  # float
    limit: torch.Tensor  # the request's window (at most the engine's)
    draft_kind: torch.Tensor  # index into model.sjd.DRAFT_KINDS
    last_tok: torch.Tensor  # global id of the last accepted token (the next window's first input)
    cfg: torch.Tensor  # float
    temperature: torch.Tensor  # float
    drafts: torch.Tensor  # [B, L] local ids of the next window's drafts
    q: torch.Tensor  # [B, L, C+2] the distributions the drafts were drawn from
    gen: torch.Tensor  # [B, max_seq + L] local ids of the image by body index

    @classmethod
    def empty(cls, max_batch: int, window: int, n_local: int, body_len: int, device) -> "Slots":
        z = lambda dtype=torch.long: torch.zeros(max_batch, dtype=dtype, device=device)
        return cls(active=z(torch.bool), speculative=z(torch.bool), pos=z(), uoff=z(), body0=z(), rows=z(), cols=z(),
                   seed=z(), nstep=z(), top_k=z(), min_p=z(torch.float), limit=z(), draft_kind=z(), last_tok=z(), cfg=z(torch.float),
                   temperature=z(torch.float), drafts=torch.zeros(max_batch, window, dtype=torch.long, device=device),
                   q=torch.zeros(max_batch, window, n_local, device=device),
                   gen=torch.zeros(max_batch, body_len, dtype=torch.long, device=device))


class Consts(NamedTuple):
    """Tensors advance() reads that do not change while the engine runs."""
    local_to_global: torch.Tensor  # [C+2] global ids of the local vocabulary
    code_q: torch.Tensor  # [C+2] the exact distribution of uniform random codes (sampling.uniform_codes_q)
    code_vectors: torch.Tensor  # [C+2, D] the head's rows of the local ids (the draft tree's carry_weights)


COMPILE_MODES = ("full", "forward", "eager")
DEFAULT_PREFILL_TOKENS = 2048  # 7b: ~4.8 GiB of attention scores per chunk over 9.8k slots (math SDPA)


class Engine:
    def __init__(self, model: Decoder, layout, max_batch: int = 8, device: str | torch.device = "cpu",
                 compile: bool = False, window: int = 16, max_seq: int | None = None, kv_bucket: int = 512,
                 cache_dtype: torch.dtype | None = None, compile_backend="inductor",
                 prefill_tokens: int = DEFAULT_PREFILL_TOKENS, tree_siblings: int = 0, tree_branch: int = 0,
                 tree_carry_tau: float | None = CARRY_TAU):
        self.model, self.layout, self.device = model, layout, torch.device(device)
        self.max_batch, self.window, self.kv_bucket = max_batch, window, kv_bucket
        self.tree = check_tree(tree_siblings, tree_branch, window)
        if not (tree_carry_tau is None or (isinstance(tree_carry_tau, (int, float)) and tree_carry_tau > 0)):
            raise ValueError(f"Engine: tree_carry_tau {tree_carry_tau!r} must be a positive number (the similarity "
                             f"temperature of the draft tree's carry-over) or None (the plain mean)")
        self.tree_carry_tau = tree_carry_tau
        # tokens fed per row and step: the window, then the draft tree's sibling branches past it
        self.nodes = window + self.tree[0] * self.tree[1]
        self.max_seq = max_seq or model.args.max_seq_len
        self.n_codes = layout.codebook_size
        if not (isinstance(prefill_tokens, int) and prefill_tokens >= 1):
            raise ValueError(f"Engine: prefill_tokens {prefill_tokens!r} must be a positive integer (tokens per "
                             f"prefill forward)")
        self.prefill_tokens = prefill_tokens
        self.cache_dtype = _cache_dtype(model, cache_dtype)
        if not model.fused and type(model.layers[0].attention.wq.weight.data) is torch.Tensor:
            model.fuse_projections()  # one GEMM for q/k/v, one for gate/up (a quantized model came fused)
        model.clear_cache()
        free = self._free_bytes()
        if free is not None:
            self.check_fits(model.args, max_batch, self.max_seq, free, self.cache_dtype, window=self.nodes,
                            n_local=self.n_codes + 2, prefill_tokens=prefill_tokens)
        model.setup_cache(2 * max_batch, self.max_seq, dtype=self.cache_dtype, device=self.device)
        # The image span only holds codes, row ends and the image end: the head keeps those rows.
        local = list(range(layout.code_offset, layout.code_offset + self.n_codes)) + [layout.row_end,
                                                                                       layout.image_end]
        self.local_to_global = torch.tensor(local, device=self.device)
        with torch.no_grad():
            self.head = model.output.weight[self.local_to_global].detach().clone()
        self.consts = Consts(self.local_to_global, S.uniform_codes_q(self.n_codes, self.n_codes + 2).to(self.device),
                             self.head)
        self.state = Slots.empty(max_batch, window, self.n_codes + 2, self.max_seq + window, self.device)
        self.jobs: list[_Job | None] = [None] * max_batch
        if self.tree[0]:
            siblings, branch = self.tree

            def tree_step(logits: torch.Tensor, s: Slots, c: Consts):
                return tree_advance(logits, s, c, siblings, branch, tree_carry_tau)

            self._advance_eager = tree_step
        else:
            self._advance_eager = advance
        self._forward, self._advance = self._decode_logits, self._advance_eager
        self.compile_mode = "eager"
        if compile:
            self.compile_mode = "full"
            # CUDA graphs of the static-shape step (paper 4.3.2); the tests trace it with "aot_eager"
            mode = "reduce-overhead" if compile_backend == "inductor" else None
            # dynamic=None: the second kv bucket recompiles once with kv_len symbolic, later buckets only
            # record their CUDA graph (a 7B graph takes about a minute to compile, REFERENCE.md)
            self._forward = torch.compile(self._decode_logits, mode=mode, backend=compile_backend, fullgraph=True,
                                          dynamic=None)
            # one CUDA graph per kv_len bucket: let dynamo keep them all
            limit = 2 * math.ceil(self.max_seq / kv_bucket) + 8
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
            self._advance = torch.compile(self._advance_eager, backend=compile_backend, fullgraph=True, dynamic=False)
        self.steps_run = 0
        self.last_kv_from: torch.Tensor | None = None  # a tree step's kv_from (tree_advance), for benches and tests

    # --- memory: the one place that sizes a batch -------------------------------------------------
    @staticmethod
    def memory_needed(model_or_args, max_batch: int, max_seq: int, cache_dtype: torch.dtype | None = None,
                      window: int = 16, n_local: int = 16386,
                      prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> dict[str, int]:
        """Bytes the engine allocates beyond the weights -> {"kv_cache", "workspace", "total"}.

        kv_cache: 2 rows (cond, uncond) x max_seq slots per slot, every layer, K and V.
        workspace: the larger of one step (activations, attention scores over max_seq, the
        sampling tensors over the n_local image ids, fp32 upper bounds) and one prefill chunk of
        prefill_tokens tokens (its attention scores are [heads, tokens, max_seq] fp32).
        """
        args = getattr(model_or_args, "args", model_or_args)
        elem = torch.finfo(_cache_dtype(model_or_args, cache_dtype)).bits // 8
        kv = 2 * max_batch * max_seq * args.n_layers * 2 * args.n_kv_heads * args.head_dim * elem
        width = 8 * args.dim + 3 * args.intermediate_size  # live activations per token, fp32 bound

        def forward_bytes(tokens: int) -> int:
            return tokens * width * 4 + 2 * tokens * args.n_heads * max_seq * 4 + tokens * max_seq

        step = forward_bytes(2 * max_batch * window) + 16 * max_batch * window * n_local * 4 \
            + max_batch * (max_seq + window) * 8
        prefill = forward_bytes(min(prefill_tokens, 2 * max_batch * max_seq))
        workspace = max(step, prefill)
        return {"kv_cache": kv, "workspace": workspace, "total": kv + workspace}

    @staticmethod
    def fit_batch(model_or_args, max_seq: int, free_bytes: int, cache_dtype: torch.dtype | None = None,
                  margin: float = 0.1, window: int = 16, n_local: int = 16386,
                  prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> int:
        """The largest max_batch whose KV cache + step workspace fits free memory -> int (0: none fits).

        Engine.fit_batch(model_or_args, max_seq, free_bytes, cache_dtype=None, margin=0.1, window=16,
                         n_local=16386, prefill_tokens=2048)
        model_or_args: a Decoder (its head's dtype is the default cache dtype) or its ModelArgs
        (default cache dtype bf16); max_seq: slots per cache row (the longest prompt + image +
        window); free_bytes: free device memory with the weights already loaded (on CUDA:
        torch.cuda.mem_get_info()[0]); margin: the fraction of free_bytes kept back (allocator
        fragmentation, CUDA graphs, compiled kernels); window, n_local (image codes + 2),
        prefill_tokens: as the engine will be built. The engine checks its own max_batch with the
        same numbers (Engine.check_fits), so a batch chosen here is never refused there.
        """
        need = lambda b: Engine.memory_needed(model_or_args, b, max_seq, cache_dtype, window, n_local,
                                              prefill_tokens)["total"]
        budget = free_bytes * (1 - margin)
        if need(1) > budget:
            return 0
        lo, hi = 1, 2
        while need(hi) <= budget:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # need() grows with the batch: bisect
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid)
        return lo

    @staticmethod
    def check_fits(model_or_args, max_batch: int, max_seq: int, free_bytes: int,
                   cache_dtype: torch.dtype | None = None, margin: float = 0.1, window: int = 16,
                   n_local: int = 16386, prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> None:
        """Raise one clear ValueError unless max_batch fits free_bytes (fit_batch's rule)."""
        need = Engine.memory_needed(model_or_args, max_batch, max_seq, cache_dtype, window, n_local, prefill_tokens)
        if need["total"] > free_bytes * (1 - margin):
            best = Engine.fit_batch(model_or_args, max_seq, free_bytes, cache_dtype, margin, window, n_local,
                                    prefill_tokens)
            raise ValueError(
                f"Engine: max_batch {max_batch} needs {_size(need['total'])} (KV cache of {2 * max_batch} rows x "
                f"{max_seq} slots {_size(need['kv_cache'])} + workspace {_size(need['workspace'])}) with "
                f"{margin:.0%} of the free memory kept back; {_size(free_bytes)} are free: use max_batch {best} "
                f"or less (Engine.fit_batch), or lower max_seq or prefill_tokens")

    def _free_bytes(self) -> int | None:
        """Free device memory (CUDA), None where the engine does not check (CPU)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.mem_get_info(self.device)[0]

    # --- read-only views kept for callers of the former attributes ------------------------------
    @property
    def pos(self) -> torch.Tensor:
        return self.state.pos

    @property
    def active(self) -> torch.Tensor:
        return self.state.active

    @property
    def nstep(self) -> torch.Tensor:
        return self.state.nstep

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
        if not 0.0 <= r.min_p < 1.0:
            raise ValueError(f"{where}: min_p {r.min_p!r} must be in [0, 1) (0 keeps every id)")
        if not r.temperature > 0:
            raise ValueError(f"{where}: temperature {r.temperature!r} must be > 0 (use a small value for greedy)")
        if not r.cfg >= 1.0:
            raise ValueError(f"{where}: cfg {r.cfg!r} is below 1; 1 turns guidance off, the release uses 4.0")
        if not (isinstance(r.window, (int, np.integer)) and r.window >= 1):
            raise ValueError(f"{where}: window {r.window!r} must be an integer >= 1 (the release uses 16)")
        if r.drafts not in DRAFT_KINDS:
            raise ValueError(f"{where}: drafts {r.drafts!r} is not a draft initialisation; choose one of "
                             f"{', '.join(DRAFT_KINDS)}")
        ids = np.asarray(r.prompt_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{where}: prompt_ids must be a non-empty list of token ids")
        if ids.min() < 0 or ids.max() >= self.model.args.vocab_size:
            raise ValueError(f"{where}: prompt_ids hold ids outside 0..{self.model.args.vocab_size - 1}")
        rows, cols = r.height // self.layout.patch, r.width // self.layout.patch
        total = len(ids) + 3 + rows * (cols + 1) + 1
        if total + self.nodes > self.max_seq:
            raise ValueError(f"{where}: {r.width}x{r.height} px with a {len(ids)}-token prompt needs {total} "
                             f"positions (+{self.nodes} for the window and its draft tree); the context holds "
                             f"{self.max_seq}: "
                             f"use a smaller image or a shorter prompt")
        try:
            prefix = list(self.layout.image_prefix(r.height, r.width))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        context = [int(i) for i in ids] + prefix
        if r.uncond_upper_codes is not None and r.upper_codes is None:
            raise ValueError(f"{where}: uncond_upper_codes without upper_codes; a panel for the unconditional "
                             f"row needs a given upper panel")
        if r.upper_codes is not None:
            context += self._panel_tokens(r.upper_codes, "upper_codes", where, rows, cols)
            if r.uncond_upper_codes is not None:
                self._panel_tokens(r.uncond_upper_codes, "uncond_upper_codes", where, rows, cols)
        return context, rows, cols

    def _panel_tokens(self, codes, what: str, where: str, rows: int, cols: int) -> list[int]:
        """An upper panel's codes -> its tokens (codes and row ends); ValueError if they do not fit."""
        up = np.asarray(codes)
        if up.shape != (rows // 2, cols):
            raise ValueError(f"{where}: {what} of shape {up.shape}; a {cols * self.layout.patch}x"
                             f"{rows * self.layout.patch} image's upper panel is ({rows // 2}, {cols}) codes")
        if not np.issubdtype(up.dtype, np.integer) or up.min() < 0 or up.max() >= self.n_codes:
            raise ValueError(f"{where}: {what} must be integer codes in 0..{self.n_codes - 1}")
        grid = np.concatenate([up.astype(np.int64) + self.layout.code_offset,
                               np.full((rows // 2, 1), self.layout.row_end)], axis=1)
        return grid.reshape(-1).tolist()

    def _uncond_context(self, job: _Job) -> list[int]:
        """The unconditional row's context: the conditional one from the image-start token on, with
        the request's uncond_upper_codes in place of its upper panel when it gives them."""
        r = job.request
        ctx = job.context[len(r.prompt_ids):]
        if r.uncond_upper_codes is None:
            return ctx
        return ctx[:3] + self._panel_tokens(r.uncond_upper_codes, "uncond_upper_codes", f"request {r.id!r}",
                                            job.rows, job.cols)  # checked in check(): it fits

    def _prefill(self, new: list[tuple[int, _Job]]) -> None:
        """Forwards over the new requests' contexts (cond and uncond rows, right-padded), at most
        prefill_tokens tokens per forward: a few rows at a time, each cut into chunks along the
        sequence (a chunk attends to the slots the earlier ones wrote, so the cache is the same).

        All but the last context token go in; the first step feeds that one. Padding writes slots
        above each row's position, which the mask hides until the row overwrites them.
        """
        seqs, rows = [], []
        for b, job in new:
            seqs += [job.context[:-1], self._uncond_context(job)[:-1]]
            rows += [b, self.max_batch + b]
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a forward
        budget = self.prefill_tokens
        group = max(1, min(len(seqs), budget // min(budget, max(len(s) for s in seqs))))
        with torch.no_grad():
            for g in range(0, len(order), group):
                idx = order[g:g + group]
                n = max(len(seqs[i]) for i in idx)
                tokens = torch.tensor([seqs[i] + [0] * (n - len(seqs[i])) for i in idx], device=self.device)
                row_ids = torch.tensor([rows[i] for i in idx], device=self.device)
                chunk = max(1, budget // len(idx))
                for s in range(0, n, chunk):
                    e = min(n, s + chunk)
                    pos = torch.arange(s, e, device=self.device).expand(len(idx), e - s)
                    kv_len = min(self.max_seq, math.ceil(e / self.kv_bucket) * self.kv_bucket)
                    self.model(tokens[:, s:e], pos, return_hidden=True, rows=row_ids, kv_len=kv_len)
        for b, job in new:
            self._start(b, job)

    def _start(self, b: int, job: _Job) -> None:
        r, ctx, dev, s = job.request, job.context, self.device, self.state
        n_prompt = len(r.prompt_ids)
        cond = torch.tensor(ctx, device=dev)
        s.gen[b] = 0
        done_body = len(ctx) - (n_prompt + 3)  # the upper panel, already in place
        if done_body:
            body = cond[n_prompt + 3:] - self.layout.code_offset
            body[body == self.layout.row_end - self.layout.code_offset] = self.n_codes
            s.gen[b, :done_body] = body
        s.pos[b], s.uoff[b], s.body0[b] = len(ctx) - 1, n_prompt, n_prompt + 3
        s.rows[b], s.cols[b], s.last_tok[b] = job.rows, job.cols, ctx[-1]
        s.seed[b], s.nstep[b], s.top_k[b], s.min_p[b] = r.seed, 0, min(r.top_k, self.n_codes), r.min_p
        s.cfg[b], s.temperature[b], s.draft_kind[b] = r.cfg, r.temperature, DRAFT_KINDS.index(r.drafts)
        s.speculative[b], s.limit[b], s.active[b] = bool(r.sjd), min(r.window, self.window), True
        one = torch.tensor([b], device=dev)
        slot = Slots(*(t[one] for t in s))
        no_carry = torch.zeros(1, self.window, dtype=torch.bool, device=dev)
        d, q = window_drafts(slot, slot.nstep - 1, slot.drafts, slot.q, no_carry, self.consts.code_q)
        s.drafts[b], s.q[b] = d[0], q[0]
        self.jobs[b] = job

    # --- the step -----------------------------------------------------------------------------
    def _decode_logits(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int,
                       slots: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.model(tokens, input_pos, return_hidden=True, kv_len=kv_len, slots=slots, attn_mask=attn_mask)
        return F.linear(h, self.head.to(h.dtype)).float()

    def _compiled_call(self, part: str, *args):
        """Run the forward or advance(); a compile error (they surface at a call: the first one,
        or a new kv bucket's) falls back one level with one warning and runs the part eagerly."""
        fn = self._forward if part == "forward" else self._advance
        if self.compile_mode == "eager" or (part == "advance" and self.compile_mode == "forward"):
            return fn(*args)
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - any compile failure must leave the job running
            root = e
            while getattr(root, "inner_exception", None) or root.__cause__:
                root = getattr(root, "inner_exception", None) or root.__cause__
            first = next((ln.strip() for ln in str(root).splitlines() if ln.strip()), "")[:300]
            name = type(e).__name__ + ("" if root is e else f" <- {type(root).__name__}")
            if part == "advance":
                self._advance, self.compile_mode = self._advance_eager, "forward"
                what = "the sampling half (advance()) runs eagerly after the compiled forward"
            else:
                self._forward, self._advance, self.compile_mode = self._decode_logits, self._advance_eager, "eager"
                what = "the whole step runs eagerly"
            log.warning("Engine: compiling the decode step's %s failed (%s: %s); %s (compile_mode=%r)",
                        part, name, first, what, self.compile_mode)
            return (self._forward if part == "forward" else self._advance)(*args)

    @torch.no_grad()
    def step(self) -> None:
        """One forward of every slot's window, then verify / sample / carry over, per slot."""
        logits = self.window_logits()
        if self.tree[0]:
            before = self.state
            self.state, kv_from = self._compiled_call("advance", logits, self.state, self.consts)
            self.move_tree_kv(before, kv_from)
            self.last_kv_from = kv_from
        else:
            self.state = self._compiled_call("advance", logits, self.state, self.consts)
        self.steps_run += 1

    def move_tree_kv(self, before: Slots, kv_from: torch.Tensor) -> None:
        """After a tree step: copy an accepted sibling branch's K/V (tree_advance's kv_from [B], the
        branch's first slot relative to the old position; 1: nothing to move) to the slots of its
        positions, old pos + 1 on, in every layer, cond and uncond rows. Every row copies the
        branch's m slots (static shapes; a row that needs nothing copies onto itself): slots past
        the accepted tokens are at or above the new position, rewritten by the next window before
        any node reads them."""
        pos_c = torch.where(before.active, before.pos, 0)
        pos_u = torch.where(before.active, before.pos - before.uoff, 0)
        at = torch.cat([pos_c, pos_u])
        src = at + torch.cat([kv_from, kv_from])
        for layer in self.model.layers:
            layer.attention.kv_cache.copy_slots(src, at + 1, self.tree[1])

    @torch.no_grad()
    def window_logits(self) -> torch.Tensor:
        """The step's forward: logits [2B, L, C+2] of every slot's window (cond rows, then uncond);
        with a draft tree [2B, N, C+2], the sibling branches' nodes after the window's."""
        s, L, dev = self.state, self.window, self.device
        offs = torch.arange(L, device=dev)
        pos_c = torch.where(s.active, s.pos, 0)[:, None] + offs
        pos_u = torch.where(s.active, s.pos - s.uoff, 0)[:, None] + offs
        window_tokens = torch.cat([s.last_tok[:, None], self.local_to_global[s.drafts[:, :L - 1]]], 1)
        window_tokens = torch.where(s.active[:, None], window_tokens, 0)
        if self.tree[0]:
            return self._tree_logits(window_tokens)
        top = int(pos_c.max()) + 1
        kv_len = min(self.max_seq, math.ceil(top / self.kv_bucket) * self.kv_bucket)
        return self._compiled_call("forward", torch.cat([window_tokens, window_tokens]),
                                   torch.cat([pos_c, pos_u]), kv_len)

    def _tree_logits(self, window_tokens: torch.Tensor) -> torch.Tensor:
        """window_logits with a draft tree: the window, then each sibling branch (its candidate and
        the main chain's drafts[1:m]) at their depths' RoPE positions, their own slots past the
        window and the tree's mask (model/sjd.py, tree_layout). Logits [2B, N, C+2]."""
        s, (siblings, branch) = self.state, self.tree
        cands = tree_candidates(s.drafts, s.q, s.seed, s.nstep, siblings)[:, 1:]
        shared = s.drafts[:, None, 1:branch].expand(-1, siblings, branch - 1)
        branches = torch.cat([cands[:, :, None], shared], 2).reshape(self.max_batch, siblings * branch)
        branch_tokens = torch.where(s.active[:, None], self.local_to_global[branches], 0)
        tokens = torch.cat([window_tokens, branch_tokens], 1)
        depth, slot, base, lo, hi = tree_layout(self.window, siblings, branch, self.device)
        pos = torch.cat([torch.where(s.active, s.pos, 0), torch.where(s.active, s.pos - s.uoff, 0)])
        top = int(pos.max()) + self.nodes
        kv_len = min(self.max_seq, math.ceil(top / self.kv_bucket) * self.kv_bucket)
        return self._compiled_call("forward", torch.cat([tokens, tokens]), pos[:, None] + depth, kv_len,
                                   pos[:, None] + slot, tree_mask(pos, base, lo, hi, kv_len))

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
            s = self.state
            done = (s.active & (s.pos >= s.body0 + s.rows * (s.cols + 1))).tolist()
            for b, finished in enumerate(done):
                if finished:
                    yield self._finish(b)

    def _finish(self, b: int) -> Result:
        job = self.jobs[b]
        self.jobs[b] = None
        self.state.active[b] = False
        n_body = job.rows * (job.cols + 1) + 1
        local = self.state.gen[b, :n_body]
        ids = self.local_to_global[local].tolist()
        prefix = job.context[len(job.request.prompt_ids):][:3]
        codes = np.asarray(self.layout.parse_image(prefix + ids))  # also checks the layout held
        done_before = len(job.context) - len(job.request.prompt_ids) - 3
        return Result(id=job.request.id, codes=codes, steps=int(self.state.nstep[b]), tokens=n_body - done_before,
                      seconds=time.perf_counter() - job.started)


def advance(logits: torch.Tensor, s: Slots, c: Consts) -> Slots:
    """Everything of a step after the forward, as one pure function (compiled on GPUs).

    logits [2B, L, C+2] (cond rows, then uncond rows), the slots before the step -> the slots
    after it: the accepted tokens written into gen, pos / nstep / last_tok moved on, and the
    next window's drafts and their q (layout-forced). Inactive slots are left as they were.
    """
    p = window_probs(logits, s)
    limit, u_acc, u_res, u_fresh = _step_draws(s)
    tokens, gained = verify(p, s.drafts, s.q, u_acc, u_res, limit, s.speculative)
    # what the carry-over keeps at each position: a fresh draw from p, or ("pac") the draft itself
    # unless the model rejects it there too
    fresh = continue_window(p, s.drafts, s.q, u_acc, u_fresh, is_pac(s.draft_kind))
    return _commit(s, c, p, tokens, gained, fresh)


def tree_advance(logits: torch.Tensor, s: Slots, c: Consts, siblings: int, branch: int,
                 carry_tau: float | None = CARRY_TAU):
    """advance() for an engine with a draft tree (model/sjd.py, "Draft tree"): logits [2B, N, C+2]
    of the window and the sibling branches (Engine._tree_logits) -> (the slots after the step,
    kv_from [B]: where the K/V of the row's accepted tokens are, as the first slot of its accepted
    sibling branch relative to the old position, or 1 where they are in place already;
    Engine.move_tree_kv applies it)."""
    b, length = s.drafts.shape
    dev = s.drafts.device
    depth = tree_layout(length, siblings, branch, dev)[0]
    p_all = window_probs(logits, s, depth)
    p, p_branches = p_all[:, :length], p_all[:, length:].reshape(b, siblings, branch, -1)
    limit, u_acc, u_res, u_fresh = _step_draws(s)
    cands = tree_candidates(s.drafts, s.q, s.seed, s.nstep, siblings)
    u_first = S.counter_uniform(s.seed, s.nstep, torch.arange(siblings + 1, device=dev), S.STREAM_TREE_ACCEPT)
    first, chosen = accept_first_of(p[:, 0], s.q[:, 0], cands, u_first, u_res, s.speculative)
    path_p, path_drafts, path_q, limit = tree_path(p, p_branches, s.drafts, s.q, first, chosen, limit)
    tokens, gained = verify(path_p, path_drafts, path_q, u_acc, u_res, limit, torch.ones_like(s.speculative))
    # after a drawn first token: the contexts weighted by their candidate's resemblance to it (None: the mean)
    weights = None if carry_tau is None else carry_weights(c.code_vectors, first, cands, carry_tau)
    carry_p = tree_carry(path_p, p, p_branches, chosen, weights)
    fresh = continue_window(carry_p, path_drafts, path_q, u_acc, u_fresh, is_pac(s.draft_kind))
    moved = _commit(s, c, carry_p, tokens, gained, fresh)
    kv_from = torch.where(s.active & (chosen >= 1) & (gained >= 2), length + (chosen - 1) * branch, 1)
    return moved, kv_from


def _step_draws(s: Slots):
    """What verify() and the carry-over read besides p: each row's limit (its window, the image's
    end) and the step's uniforms (acceptance [B, L], residual [B], fresh [B, L])."""
    b, length = s.drafts.shape
    offs = torch.arange(length, device=s.drafts.device)
    end = s.body0 + s.rows * (s.cols + 1)  # position of the image end
    limit = torch.minimum(s.limit, (end - s.pos).clamp(min=1))
    idx = offs.expand(b, length)
    u_acc = S.counter_uniform(s.seed, s.nstep, idx, S.STREAM_ACCEPT)
    u_res = S.counter_uniform(s.seed, s.nstep, offs[:1].expand(b, 1), S.STREAM_RESIDUAL)[:, 0]
    return limit, u_acc, u_res, S.counter_uniform(s.seed, s.nstep, idx, S.STREAM_FRESH)


def _commit(s: Slots, c: Consts, p: torch.Tensor, tokens: torch.Tensor, gained: torch.Tensor,
            fresh: torch.Tensor) -> Slots:
    """The slots after a step: the kept tokens (verify's) written, each active slot moved forward by
    what it gained, and the next window (the carry-over of fresh [B, L] with p as q, the rest by
    each slot's draft kind)."""
    length = s.drafts.shape[1]
    offs = torch.arange(length, device=s.drafts.device)
    body_next = (s.pos - s.body0)[:, None] + offs + 1  # body index each window position predicts
    # Write the kept tokens by body index; move each active slot forward by what it gained.
    act = s.active
    at = body_next.clamp(0, s.gen.shape[1] - 1)
    keep = (offs[None] < gained[:, None]) & act[:, None]
    gen = s.gen.scatter(1, at, torch.where(keep, tokens, s.gen.gather(1, at)))
    last = tokens.gather(1, (gained - 1).clamp(min=0)[:, None])[:, 0]
    moved = s._replace(gen=gen, pos=torch.where(act, s.pos + gained, s.pos), nstep=s.nstep + act.long(),
                       last_tok=torch.where(act, c.local_to_global[last], s.last_tok))

    # The next window: Jacobi carry-over past the accepted ones, the rest by each slot's draft kind.
    carried, carried_q = next_window(p, fresh, gained, random_drafts(s.seed, s.nstep, length, p.shape[-1] - 2))
    carry = (offs[None] + gained[:, None]) < length
    drafts, q = window_drafts(moved, s.nstep, carried, carried_q, carry, c.code_q)
    return moved._replace(drafts=torch.where(act[:, None], drafts, s.drafts),
                          q=torch.where(act[:, None, None], q, s.q))


def window_probs(logits: torch.Tensor, s: Slots, depth: torch.Tensor | None = None) -> torch.Tensor:
    """The target distribution p [B, N, C+2] of each slot's window positions: CFG, the layout's
    constraints, top-k, temperature, min-p. depth [N]: each node's depth in the window (default: the
    window's 0..L-1; a draft tree's nodes, model/sjd.py tree_layout)."""
    b, length = s.drafts.shape
    if depth is None:
        depth = torch.arange(length, device=s.drafts.device)
    body_next = (s.pos - s.body0)[:, None] + depth + 1
    kind = S.position_kinds(body_next, s.rows, s.cols)
    guided = S.cfg_mix(logits[:b], logits[b:], s.cfg)
    return S.probs_from_logits(guided, S.allowed_local(kind, s.q.shape[-1] - 2), s.temperature, s.top_k, s.min_p)


def window_drafts(s: Slots, step: torch.Tensor, carried: torch.Tensor, carried_q: torch.Tensor,
                  carry: torch.Tensor, code_q: torch.Tensor):
    """Drafts and q of the window after s.pos: the carry-over where carry, the slot's draft kind
    elsewhere (model/sjd.py, refill), row ends and the image end forced. step: the draws' step."""
    length, n_codes = carried.shape[1], code_q.shape[0] - 2
    offs = torch.arange(length, device=carried.device)
    body_next = (s.pos - s.body0)[:, None] + offs + 1
    above_at = body_next - (s.cols[:, None] + 1)
    known = (above_at >= 0) & (above_at <= (s.pos - s.body0)[:, None])  # that row is accepted
    above = s.gen.gather(1, above_at.clamp(0, s.gen.shape[1] - 1))
    above = torch.where(known, above, 0)
    # "pac+above": a row above that is still a carried draft of this window counts too
    in_win, known_in_win = above_in_window(carried, carry, s.cols + 1, above, known)
    mine = in_window_above(s.draft_kind)[:, None]
    above, known = torch.where(mine, in_win, above), torch.where(mine, known_in_win, known)
    idx = offs.expand(carried.shape)
    random = random_drafts(s.seed, step, length, n_codes)
    u_mix = S.counter_uniform(s.seed, step, idx, S.STREAM_MIX)
    drafts, q = refill(carried, carried_q, carry, above, known, random, u_mix, code_q, s.draft_kind)
    return force_layout(drafts, q, S.position_kinds(body_next, s.rows, s.cols), n_codes)


def check_tree(siblings, branch, window: int) -> tuple[int, int]:
    """(siblings, branch) of Engine's draft tree, checked: (0, 0) is none."""
    ok = all(isinstance(x, (int, np.integer)) and x >= 0 for x in (siblings, branch))
    if ok and siblings == branch == 0:
        return 0, 0
    if not (ok and siblings >= 1 and 1 <= branch <= window - 1):
        raise ValueError(f"Engine: draft tree tree_siblings={siblings!r}, tree_branch={branch!r}: give both as "
                         f"integers, siblings >= 1 and 1 <= branch <= window - 1 = {window - 1} (or both 0: no tree)")
    return int(siblings), int(branch)


def random_drafts(seed, step, length: int, n_codes: int):
    """Uniformly random codes (local ids) to refill a window: SJD's initial drafts."""
    bits = S.counter_bits(seed, step, torch.arange(length, device=seed.device), S.STREAM_DRAFT)
    return S.uniform_codes(bits, n_codes)


def _cache_dtype(model_or_args, cache_dtype: torch.dtype | None) -> torch.dtype:
    """The KV cache's dtype: the one asked, else the head's (a float one: the head is never
    quantized), else bf16 (ModelArgs alone, or a head that is not floating point)."""
    if cache_dtype is not None:
        return cache_dtype
    head = getattr(getattr(model_or_args, "output", None), "weight", None)
    return head.dtype if head is not None and head.dtype.is_floating_point else torch.bfloat16


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
