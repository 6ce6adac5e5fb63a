"""The decoder's training step as plain functions: no Ray, no Prefect; one GPU, one CPU, or a
process group (Ray Train wraps it in tasks/train/job.py; bench/train.py calls it directly).

    python -c "from model.training import lr_at; print([round(lr_at(s, peak=2e-4, total=10, warmup=2), 6) for s in range(10)])"

What it implements (REFERENCE.md, "The decoder"; Lumina-mGPT 2.0 section 5.1):
- loss on the supervised (image) tokens only: prompt positions are -100; plus the z-loss
  1e-5 * logsumexp(logits)^2 over the same positions;
- the cross-entropy is computed from the final hidden states in chunks of supervised
  positions, each chunk's logits recomputed in backward, so a 171k vocabulary never holds
  [B, T, V] logits in memory, and each chunk's softmax is taken in the logits' dtype with fp32
  sums (_LogitsLoss), so no fp32 copy of a chunk's [n, V] logits either;
- a non-finite loss or gradient norm skips the optimizer step (all ranks agree) and says so;
- AdamW (0.9, 0.95), weight decay 0.1 on matrices only (norm gains, biases and embeddings
  are not decayed, as in Llama/torchtitan practice);
- warmup then cosine or linear decay;
- gradient accumulation: the loss is normalised by the supervised tokens of the WHOLE
  global batch (all micro batches, all ranks), so accumulation and data parallelism give the
  same gradient as one big batch;
- classifier-free guidance training: a dropped sample keeps only its image part (from the
  image-start token on), like the unconditional branch at sampling;
- parallelize(): FSDP2 fully_shard per layer with bf16 mixed precision, activation
  checkpointing (none | selective | full; choose_activation_checkpointing picks the least
  recompute that fits the device's memory) and torch.compile per layer on GPUs; DDP (gloo) or
  nothing on CPUs; fused AdamW whenever every parameter is on CUDA.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
Z_LOSS = 1e-5


# --- batches --------------------------------------------------------------------------------

@dataclass
class Batch:
    """One micro batch: inputs [B, T] and next-token labels [B, T] (-100 where not supervised)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    tokens: int = 0  # real (unpadded) input positions
    positions: torch.Tensor | None = None  # packed rows: each sample's positions start at 0
    doc: torch.Tensor | None = None  # packed rows: which sample of the row each position is (-1: padding)

    @property
    def supervised(self) -> int:
        return int((self.labels != IGNORE).sum())


def drop_context(ids: list[int], loss_start: int, image_start: int) -> tuple[list[int], int]:
    """The classifier-free-guidance sample: only the tokens from the image-start token on.

    At sampling the unconditional branch sees exactly this (REFERENCE.md, "Classifier-free
    guidance"), so training on it is what makes `uncond` meaningful.
    """
    try:
        start = ids.index(image_start)
    except ValueError:
        raise ValueError(f"sample has no image-start token (id {image_start}): cannot drop its context") from None
    return ids[start:], max(loss_start - start, 0)


def make_batch(samples: list[tuple[list[int], int]], pad_id: int = 0, pad_multiple: int = 8,
               device: torch.device | str = "cpu") -> Batch:
    """(ids, loss_start) samples -> a right-padded Batch; position t predicts token t+1.

    Token j is supervised when j >= loss_start; padding is never supervised. Right padding
    leaves every real position's causal context unchanged. Lengths round up to pad_multiple
    so compiled kernels see few distinct shapes.
    """
    if not samples:
        raise ValueError("make_batch: no samples")
    t = max(len(ids) for ids, _ in samples) - 1
    t = -(-t // pad_multiple) * pad_multiple
    inputs = torch.full((len(samples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), t), IGNORE, dtype=torch.long)
    for i, (ids, loss_start) in enumerate(samples):
        x = torch.as_tensor(ids, dtype=torch.long)
        n = len(ids) - 1
        inputs[i, :n] = x[:-1]
        lab = x[1:].clone()
        lab[: max(loss_start - 1, 0)] = IGNORE  # label at position p is token p+1
        labels[i, :n] = lab
    real = sum(len(ids) - 1 for ids, _ in samples)
    return Batch(inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True), real)


def pack(lengths: list[int], length: int) -> list[list[int]]:
    """Sample indices per row: first-fit decreasing into rows of `length` input positions (a
    sample of n tokens takes n - 1 positions). A sample longer than a row is an error."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        need = lengths[i] - 1
        if need > length:
            raise ValueError(f"pack: a sample of {lengths[i]} tokens does not fit rows of {length} positions")
        for r, room in enumerate(free):
            if room >= need:
                rows[r].append(i)
                free[r] -= need
                break
        else:
            rows.append([i])
            free.append(length - need)
    return rows


def make_packed_batches(samples: list[tuple[list[int], int]], length: int, rows_per_batch: int,
                        n_batches: int | None = None, pad_id: int = 0,
                        device: torch.device | str = "cpu") -> list[Batch]:
    """(ids, loss_start) samples -> micro batches of exactly [rows_per_batch, length]: samples
    packed into rows (pack()), positions restarting at 0 in each sample, `doc` telling the
    samples of a row apart so attention stays inside each (attention_mask). One shape for the
    whole stage: a compiled step never sees another. n_batches pads with empty micro batches
    (no supervised token) so every rank runs as many forwards as the others (FSDP collectives).
    Each sample's labels are exactly make_batch's, so the loss is the padded batch's loss.
    """
    rows = pack([len(ids) for ids, _ in samples], length)
    need = -(-len(rows) // rows_per_batch)
    n = max(need, n_batches or 0)
    inputs = torch.full((n * rows_per_batch, length), pad_id, dtype=torch.long)
    labels = torch.full_like(inputs, IGNORE)
    positions = torch.zeros_like(inputs)
    doc = torch.full_like(inputs, -1)
    real = [0] * n
    for r, members in enumerate(rows):
        at = 0
        for j, i in enumerate(members):
            ids, loss_start = samples[i]
            x = torch.as_tensor(ids, dtype=torch.long)
            m = len(ids) - 1
            inputs[r, at:at + m] = x[:-1]
            lab = x[1:].clone()
            lab[: max(loss_start - 1, 0)] = IGNORE
            labels[r, at:at + m] = lab
            positions[r, at:at + m] = torch.arange(m)
            doc[r, at:at + m] = j
            at += m
            real[r // rows_per_batch] += m
    out = []
    for k in range(n):
        sl = slice(k * rows_per_batch, (k + 1) * rows_per_batch)
        out.append(Batch(inputs[sl].to(device, non_blocking=True), labels[sl].to(device, non_blocking=True), real[k],
                         positions[sl].to(device, non_blocking=True), doc[sl].to(device, non_blocking=True)))
    return out


def attention_mask(doc: torch.Tensor, flex: bool | None = None):
    """The mask of packed rows: position q sees position k when both belong to the same sample
    (padding counts as one more) and k <= q. flex (default on CUDA): a FlexAttention BlockMask,
    computing only the blocks inside samples; otherwise a bool [B, 1, T, T] for SDPA (CPUs:
    FlexAttention has no backward there)."""
    b, t = doc.shape
    if flex is None:
        flex = doc.is_cuda
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask

        def same_sample_causal(bi, h, q, k):
            return (doc[bi, q] == doc[bi, k]) & (k <= q)

        # compiled on GPUs: the mask is built block by block, never as a [B, T, T] tensor
        return create_block_mask(same_sample_causal, b, None, t, t, device=doc.device, _compile=doc.is_cuda)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def cfg_dropped(seed: int, *key, p: float = 0.1) -> bool:
    """Deterministic coin for the CFG context drop: a pure function of (seed, key), so a
    resumed run drops the same samples as an uninterrupted one."""
    return p > 0 and random.Random(":".join(map(str, (seed, *key)))).random() < p


# --- loss -----------------------------------------------------------------------------------

class _LogitsLoss(torch.autograd.Function):
    """[sum of cross-entropy, sum of logsumexp^2] of one chunk of logits [n, V], in the logits'
    own dtype: no fp32 copy of [n, V] (bf16 on GPUs); the reductions accumulate in fp32.

    Forward: m = max (exact in any dtype), s = sum exp(logits - m) accumulated in fp32,
    lse = m + log s. Backward: d/dlogits = softmax * (g_ce + 2 g_z lse) - g_ce * onehot, the
    softmax rebuilt as exp(logits - m) / s in one [n, V] buffer of the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        m = logits.amax(-1, keepdim=True)
        s = torch.exp(logits - m).sum(-1, dtype=torch.float32)
        lse = m.squeeze(-1).float() + s.log()
        ce = lse - logits.gather(-1, target[:, None]).squeeze(-1).float()
        ctx.save_for_backward(logits, target, m, s, lse)
        return torch.stack([ce.sum(), lse.pow(2).sum()])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        logits, target, m, s, lse = ctx.saved_tensors
        g = g.float()
        grad = torch.exp(logits - m)
        grad.mul_(((g[0] + 2 * g[1] * lse) / s)[:, None].to(grad.dtype))
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, target] -= g[0].to(grad.dtype)
        return grad, None


def _chunk_loss(head: nn.Module, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _LogitsLoss.apply(head(h), target)


def chunked_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, chunk: int = 2048,
                 recompute: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sum of cross-entropy, sum of logsumexp^2, n) over the supervised positions.

    Only supervised positions reach the head (prompt and padding rows are skipped). With
    recompute, each chunk's [chunk, V] logits are freed after forward and rebuilt in backward.
    """
    mask = labels.reshape(-1) != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[mask]
    y = labels.reshape(-1)[mask]
    total = hidden.new_zeros(2, dtype=torch.float32)
    for i in range(0, h.shape[0], chunk):
        args = (head, h[i:i + chunk], y[i:i + chunk])
        part = checkpoint(_chunk_loss, *args, use_reentrant=False) if recompute and torch.is_grad_enabled() \
            else _chunk_loss(*args)
        total = total + part
    if h.shape[0] == 0:  # keep the graph connected to every parameter (DDP/FSDP expect grads)
        total = total + 0.0 * hidden.sum()
    return total[0], total[1], int(y.numel())


# --- optimizer and schedule -------------------------------------------------------------------

def build_optimizer(model: nn.Module, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.1,
                    fused: bool | None = None) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # The qk-norm gains and biases are [heads, head_dim] matrices but norms all the same.
        matrix = p.ndim >= 2 and "tok_embeddings" not in name and "norm" not in name
        (decay if matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused or None)


def lr_at(step: int, *, peak: float, total: int, warmup: int = 0, decay: str = "cosine",
          min_ratio: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear/constant."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant":
        return peak
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * p))
    elif decay == "linear":
        f = 1 - p
    else:
        raise ValueError(f"decay {decay!r}: expected cosine, linear or constant")
    return peak * (min_ratio + (1 - min_ratio) * f)


# --- parallelism ------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


AC_POLICIES = ("none", "selective", "full")


def _selective_policy():
    """Op-level selective checkpointing: keep what is expensive to recompute (matmul outputs and
    attention), recompute the cheap rest (norms, rope, SiLU, products) in backward."""
    from torch.utils.checkpoint import (
        CheckpointPolicy,
        create_selective_checkpoint_contexts,
    )

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        op = getattr(aten, name, None)
        if op is not None:
            save.add(op.default)
    flex = getattr(torch.ops.higher_order, "flex_attention", None)  # packed rows on GPUs
    if flex is not None:
        save.add(flex)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return lambda: create_selective_checkpoint_contexts(policy)


def activation_bytes_per_token(args, policy: str, dtype_bytes: int = 2) -> float:
    """Activation memory one token keeps for backward across all layers (an estimate).

    Per layer, without checkpointing: the norms' inputs and outputs, q/k/v before and after
    qk-norm and rope, attention output, the residuals (about 16 x dim) and the SwiGLU's gate,
    up, activation and product (4-5 x hidden); selective keeps the matmul and attention outputs
    (about 7 x dim + 2 x hidden); full keeps the layer input only (plus one layer's worth,
    rebuilt during its backward).
    """
    d, f, n = args.dim, args.intermediate_size, args.n_layers
    per_layer = {"none": 16 * d + 5 * f, "selective": 7 * d + 2 * f, "full": d}[policy]
    rebuilt = 0 if policy == "none" else 16 * d + 5 * f  # one layer recomputed at a time
    return dtype_bytes * (n * per_layer + rebuilt)


def choose_activation_checkpointing(args, tokens_per_micro_batch: int, world: int, memory_bytes: float,
                                    n_params: int, loss_chunk: int = 2048, headroom: float = 0.85) -> str:
    """The least recompute that fits: none, else selective, else full.

    Memory: fp32 parameters, gradients and two AdamW moments sharded over `world` ranks (16
    bytes a parameter), one unsharded bf16 layer in flight, a chunk of bf16 logits with its
    gradient, and the activations of one micro batch under each policy.
    """
    state = 16 * n_params / world + 2 * 2 * n_params / max(1, args.n_layers)
    logits = 3 * 2 * loss_chunk * args.vocab_size
    for policy in AC_POLICIES:
        need = state + logits + tokens_per_micro_batch * activation_bytes_per_token(args, policy)
        if need <= headroom * memory_bytes:
            return policy
    return "full"


def _ac_policy(value) -> str:
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in AC_POLICIES:
        raise ValueError(f"activation checkpointing {value!r}: expected one of {AC_POLICIES}")
    return value


def parallelize(model: nn.Module, device: torch.device, *, mixed_precision: bool = True,
                activation_checkpointing: str | bool = "full", compile: bool = True,
                compile_dynamic: bool = True) -> nn.Module:
    """Wrap the decoder for training on `device`; the same call on one rank or many.

    activation_checkpointing: none | selective (op level: matmul and attention outputs kept) |
    full (each layer's input kept, the layer rebuilt in backward); True/False mean full/none.
    CUDA: per layer, activation checkpointing, then torch.compile of the layer (per-layer
    compile reached 46% MFU vs 27% eager, REFERENCE.md; whole-model compile did not finish;
    compile_dynamic=False when the inputs are packed to one shape per stage), then FSDP2
    fully_shard with bf16 params and fp32 gradient reduction. The output head is its own FSDP
    unit kept unsharded after forward, as the chunked loss calls it once per chunk.
    CPU: fp32, DDP over the process group when there is one (gloo).
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        checkpoint_wrapper,
    )

    distributed = dist.is_available() and dist.is_initialized()
    policy = _ac_policy(activation_checkpointing)
    if policy != "none":
        kwargs = {"context_fn": _selective_policy()} if policy == "selective" else {}
        for i, layer in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(layer, **kwargs)
    if device.type == "cuda":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not distributed:
            raise RuntimeError("parallelize on CUDA needs a process group (FSDP2): init_process_group first "
                               "(bench/train.py makes a one-rank group)")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision else torch.float32,
                                  reduce_dtype=torch.float32)
        model.to(device)
        for layer in model.layers:
            if compile:
                layer.compile(dynamic=compile_dynamic)
            fully_shard(layer, mp_policy=mp)
        fully_shard(model.output, mp_policy=mp, reshard_after_forward=False)
        fully_shard(model, mp_policy=mp)
        return model
    model.to(device)
    if distributed and dist.get_world_size() > 1:
        return nn.parallel.DistributedDataParallel(model)
    return model


def _no_grad_sync(model: nn.Module, last: bool):
    """Skip the gradient all-reduce on all but the last micro batch of an accumulation."""
    if last:
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(True)
        return nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
    return nullcontext()


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[Batch], lr: float, *,
               z_loss: float = Z_LOSS, loss_chunk: int = 2048, grad_clip: float | None = 1.0) -> dict:
    """One optimizer step over the micro batches of this rank -> metrics of the global batch.

    Returns loss (cross-entropy per supervised token), z_loss (mean logsumexp^2), tokens
    (supervised, global), seq_tokens (real input positions incl. prompts, no padding, global),
    grad_norm, lr, skipped (True when the loss or the gradient norm was not finite: the
    optimizer did not step and the gradients were dropped; the caller counts these).
    """
    device = micro_batches[0].inputs.device
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    local = [b.supervised for b in micro_batches]
    n_global, seq_global = _all_sum([float(sum(local)), float(sum(b.tokens for b in micro_batches))], device)
    if n_global == 0:
        raise ValueError("train_step: the global batch has no supervised tokens (all labels are -100)")
    for group in optimizer.param_groups:
        group["lr"] = lr
    inner = unwrap(model)
    ce_sum = z_sum = 0.0
    for i, b in enumerate(micro_batches):
        with _no_grad_sync(model, last=i == len(micro_batches) - 1):
            if b.doc is None:
                hidden = model(b.inputs, return_hidden=True)
            else:  # packed rows
                hidden = model(b.inputs, input_pos=b.positions, return_hidden=True, attn_mask=attention_mask(b.doc))
            ce, zz, _ = chunked_loss(hidden, b.labels, inner.output, chunk=loss_chunk)
            # DDP and FSDP average gradients over ranks: scale by world so the result is the
            # sum over the global batch divided by its supervised tokens.
            loss = (ce + z_loss * zz) * (world / n_global)
            loss.backward()
        ce_sum += float(ce.detach())
        z_sum += float(zz.detach())
    ce_all, z_all = _all_sum([ce_sum, z_sum], device)
    # The norm of all gradients (clipped to grad_clip when given): DDP and FSDP hold the same
    # reduced gradients on every rank, so every rank sees the same norm and takes the same skip.
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    grad_norm = float(norm)
    finite = math.isfinite(ce_all) and math.isfinite(z_all) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": ce_all / n_global, "z_loss": z_all / n_global, "tokens": int(n_global),
            "seq_tokens": int(seq_global), "grad_norm": grad_norm, "lr": lr, "skipped": not finite}


# --- throughput -------------------------------------------------------------------------------

def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """6N + 12 L d s (REFERENCE.md's MFU formula): N without the input embedding."""
    inner = unwrap(model)
    args = inner.args
    n = sum(p.numel() for name, p in inner.named_parameters() if "tok_embeddings" not in name)
    return 6.0 * n + 12.0 * args.n_layers * args.dim * seq_len


_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "B200": 2250e12}


def peak_flops(device: torch.device, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained): the bf16 dense datasheet peak of known GPUs; on a CPU,
    a measured fp32 matmul rate (an achievable peak, not a datasheet one)."""
    if override_tflops:
        return override_tflops * 1e12, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in _PEAK_BF16.items():
            if key in name:
                return value, f"datasheet bf16 {key}"
        return float("nan"), f"unknown GPU {name}"
    # The best of several short trials: on a shared machine, the rate when it was least busy.
    a = torch.randn(1024, 1024)
    a @ a
    best = 0.0
    for _ in range(8):
        t0 = time.perf_counter()
        a @ a
        best = max(best, 2 * 1024**3 / (time.perf_counter() - t0))
    return best, "measured fp32 matmul (best of 8)"
