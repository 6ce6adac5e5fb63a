"""Train the tiny MoVQGAN on the shapes source: the image tokenizer the demo ships.

    python -m tasks.assets.train_movqgan --steps 800 --out assets/movqgan-tiny.safetensors --preview /tmp/movq-recon.png
    python -m tasks.assets.train_movqgan --init-from assets/movqgan-tiny.safetensors --freeze-codes --steps 2000 \
        --lr 5e-4 --edge-weight 1.0 --out /tmp/movq-sharper.safetensors --preview /tmp/movq-sharper.png

Images: shapes scenes rendered by tasks/shapes/scenes.py plus the control maps the panels hold (canny,
soft edge, depth), so the tokenizer sees everything the demo encodes. Random crops and flips.
Losses: L1 + MSE reconstruction, codebook ||sg(z) - e||^2 and commitment 0.25 ||z - sg(e)||^2
(VQ-VAE eq. 3). The official MoVQGAN also trains with LPIPS and a patch GAN; for flat-coloured
shapes the pixel losses are enough and keep training to minutes on one CPU core. The codebook
starts from encoder outputs and codes unused for a while are restarted on current ones (dead-code
restart, as in Jukebox / improved VQGAN training), so a small budget still uses most codes.
One thread by default: the development machines are shared.

--freeze-codes (with --init-from) trains only the decoder half (post_quant_conv, decoder) and keeps
the encoder, quant_conv and codebook bit for bit: every image gets the same codes as before, so a
transformer decoder trained on the old codes stays valid and only the pictures it draws get
sharper. Codes are taken from whole images, the way the pipeline encodes them, and the decoder
learns on windows of that code grid (no flips: a flipped image has other codes). --edge-weight
adds an L1 loss on the image gradients, which for flat-coloured shapes is where the pixel losses
leave the blur. --keep-codes FILE (code grids a transformer decoder generated:
tasks/assets/generated_codes.py) adds a second loss on windows of those grids, against the picture
--keep-reference's decoder half (default --init-from's) draws of them: a decoder half judged on real
pictures' codes alone can draw generated codes worse (docs/assets.md, steps 30 and 31).
--canny-weight adds an L1 on the 3x3 Sobel responses cv2.Canny reads, on the pixels next to the
picture's own canny edges only: exact-pixel canny F1 is decided there, a small share of the pixels
that whole-picture losses weigh by their count (docs/assets.md, step 34).

--init-from without --freeze-codes goes on training all of a trained MoVQGAN (crops, flips, dead-code
restarts, as from scratch), with --edge-weight: sharper codes, not only sharper pictures of the old
ones. Its codes differ from --init-from's, so a transformer decoder trained on those must be trained
on the new ones (the images re-tokenized) before the pair ships. --context-weight (with it or from
scratch) trains on whole pictures beside copies with one half swapped and pulls the kept half's
latents together: codes that stay local, the same whatever panel stands beside them (docs/assets.md,
"Local codes").
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from model.movqgan import MoVQGAN, count_parameters, load_movqgan, read_state_dict, save_movqgan, to_uint8
from tasks.panels.annotators import canny, soft_edge
from tasks.shapes.scenes import render_scene

log = logging.getLogger(__name__)


def image_pool(count: int, size: int = 128, first_seed: int = 0) -> np.ndarray:
    """uint8 [count, size, size, 3]: scenes, and every 4th slot a control map of one (canny, soft
    edge, depth in turn) drawn as grey RGB like the panels store them."""
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        scene = render_scene(first_seed + i, size, size)
        kind = i % 8
        if kind == 1:
            m = canny(scene.image)
        elif kind == 3:
            m = soft_edge(scene.image)
        elif kind == 5:
            m = scene.depth_vis
        else:
            out[i] = scene.image
            continue
        out[i] = np.repeat(m[..., None], 3, axis=2)
    return out


def _context_batch(pool: np.ndarray, rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, int]:
    """[2 * batch] whole pool images: `batch` of them, then the same with one half (the upper or the
    lower, the same for all) taken from other images; and which half was kept (0 upper, 1 lower).
    A dual panel is two pictures in one image: each panel's codes should not depend on the other."""
    n, h = pool.shape[:2]
    idx, other = rng.integers(0, n, batch), rng.integers(0, n, batch)
    keep = int(rng.integers(0, 2))
    x = pool[idx]
    y = x.copy()
    swap = slice(h // 2, h) if keep == 0 else slice(0, h // 2)
    y[:, swap] = pool[other][:, swap]
    return torch.from_numpy(np.concatenate([x, y])).permute(0, 3, 1, 2).float() / 127.5 - 1.0, keep


def _batch(pool: np.ndarray, rng: np.random.Generator, batch: int, crop: int) -> torch.Tensor:
    idx = rng.integers(0, len(pool), batch)
    n, h, w, _ = pool.shape
    ys, xs = rng.integers(0, h - crop + 1, batch), rng.integers(0, w - crop + 1, batch)
    x = np.stack([pool[i, y:y + crop, x_:x_ + crop] for i, y, x_ in zip(idx, ys, xs)])
    flip = rng.random(batch) < 0.5
    x[flip] = x[flip, :, ::-1]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def _restart_dead_codes(model: MoVQGAN, z: torch.Tensor, usage: torch.Tensor, rng: torch.Generator) -> int:
    dead = torch.nonzero(usage == 0).flatten()
    if dead.numel() == 0:
        return 0
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=rng)
    model.quantize.embedding.weight.data[dead] = flat[pick] + 0.01 * torch.randn(dead.numel(), flat.shape[1], generator=rng)
    return int(dead.numel())


def grow_codebook(model: MoVQGAN, n_embed: int) -> MoVQGAN:
    """The same MoVQGAN with a codebook of `n_embed` entries: every weight and the first entries
    copied, so each image keeps its codes until training moves them; the new entries start far from
    every latent, never the nearest (train() restarts them on encoder outputs before its first step)."""
    old = model.n_embed
    if n_embed < old:
        raise ValueError(f"--codes {n_embed}: the codebook has {old} entries; it can grow, not shrink")
    if n_embed == old:
        return model
    grown = MoVQGAN(config=model.config, n_embed=n_embed)
    sd = model.state_dict()
    w = sd["quantize.embedding.weight"]
    far = torch.full((n_embed - old, w.shape[1]), 1e3 * (1.0 + float(w.abs().max())), dtype=w.dtype)
    sd["quantize.embedding.weight"] = torch.cat([w, far])
    grown.load_state_dict(sd, strict=True)
    return grown.train(model.training)


def gradient_l1(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and vertical finite differences: penalises soft edges directly."""
    return (F.l1_loss(recon[..., :, 1:] - recon[..., :, :-1], x[..., :, 1:] - x[..., :, :-1])
            + F.l1_loss(recon[..., 1:, :] - recon[..., :-1, :], x[..., 1:, :] - x[..., :-1, :]))


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _sobel(x: torch.Tensor) -> torch.Tensor:
    """Each channel's 3x3 Sobel x and y responses, as cv2.Canny computes them: [n, 2c, h-2, w-2]."""
    c = x.shape[1]
    k = torch.stack([_SOBEL, _SOBEL.T]).to(x).unsqueeze(1).repeat(c, 1, 1, 1)
    return F.conv2d(x, k, groups=c)


def canny_weights(x: torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """Where canny finds edges in the pictures x ([n, 3, h, w] in [-1, 1]), widened by one pixel on
    each side (the neighbours its non-maximum suppression compares): float [n, 1, h-2, w-2], the
    shape of _sobel's output."""
    px = ((x.detach() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    near = [cv2.dilate(canny(np.ascontiguousarray(p), low, high), np.ones((3, 3), np.uint8)) > 0 for p in px]
    return torch.from_numpy(np.stack(near)[:, 1:-1, 1:-1]).float().unsqueeze(1)


def canny_l1(recon: torch.Tensor, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L1 between the Sobel responses canny reads, on the pixels near x's canny edges only (weights:
    canny_weights(x)), per such pixel: where the edge maps are decided, which whole-picture losses
    leave to a small share of the pixels. 0 where x has no edges."""
    diff = _sobel(recon - x).abs().mean(dim=1, keepdim=True)  # Sobel is linear: one convolution
    return (diff * weights).sum() / weights.sum().clamp(min=1.0)


FROZEN_PREFIXES = ("encoder.", "quant_conv.", "quantize.")  # what decides the codes


@torch.no_grad()
def pool_codes(model: MoVQGAN, pool: np.ndarray, batch: int = 32) -> torch.Tensor:
    """The codes of whole pool images, as the pipeline would encode them: LongTensor [n, h/8, w/8]."""
    return torch.cat([model.quantize.indices(model.quant_conv(model.encoder(
        torch.from_numpy(pool[i:i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0)))
        for i in range(0, len(pool), batch)])


def _windows(codes: torch.Tensor, rng: np.random.Generator, batch: int, window: int) -> tuple[torch.Tensor, list]:
    """Random windows of `window` x `window` codes from the grids `codes` [n, rows, cols], and where
    each was taken (grid, row, column)."""
    idx = rng.integers(0, len(codes), batch)
    _, ch, cw = codes.shape
    k = min(window, ch, cw)
    ys, xs = rng.integers(0, ch - k + 1, batch), rng.integers(0, cw - k + 1, batch)
    at = list(zip(idx, ys, xs))
    return torch.stack([codes[i, y:y + k, x_:x_ + k] for i, y, x_ in at]), at


def _code_windows(pool: np.ndarray, codes: torch.Tensor, rng: np.random.Generator, batch: int,
                  window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `window` x `window` codes of the pool's pictures and the pixels they stand for."""
    c, at = _windows(codes, rng, batch, window)
    k = c.shape[1]
    px = np.stack([pool[i, 8 * y:8 * (y + k), 8 * x_:8 * (x_ + k)] for i, y, x_ in at])
    return c, torch.from_numpy(px).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_keep_codes(path: str | Path) -> torch.Tensor:
    """The generated code grids of tasks.assets.generated_codes' file, LongTensor [n, rows, cols]
    (the largest group of one shape: windows are cut from grids of one size)."""
    from safetensors.torch import load_file

    groups = load_file(str(path))
    if not groups:
        raise ValueError(f"{path}: holds no code grids")
    return max(groups.values(), key=len).long()


def _pixel_losses(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 + MSE, gradient L1) of a decoded picture against the one it should be."""
    return F.l1_loss(pred, target) + F.mse_loss(pred, target), gradient_l1(pred, target)


def _render(model: MoVQGAN, codes: torch.Tensor) -> torch.Tensor:
    """The decoder half's picture of a code grid, in [-1, 1]."""
    zq = model.quantize.lookup(codes)
    return model.decoder(model.post_quant_conv(zq), zq)


def _progress(step: int, steps: int, t0: float, budget_seconds: float | None) -> float:
    """How far a run is (1.0: done), by steps or by wall time, whichever is further."""
    return max(step / steps, (time.perf_counter() - t0) / budget_seconds if budget_seconds else 0.0)


def _warmup_cosine(peak: float, done: float) -> float:
    """The learning rate at progress `done`: 5% linear warmup, then cosine to 1% of the peak."""
    return peak * (done / 0.05 if done < 0.05 else 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (done - 0.05) / 0.95)))


def finetune_decoder(init_from: str, preset: str = "tiny", steps: int = 2000, batch: int = 8, window: int = 8,
                     lr: float = 5e-4, edge_weight: float = 1.0, pool_size: int = 768, seed: int = 1,
                     threads: int = 1, log_every: int = 50,
                     budget_seconds: float | None = None, keep_codes: torch.Tensor | None = None,
                     keep_weight: float = 0.0, keep_reference: str | None = None,
                     canny_weight: float = 0.0) -> tuple[MoVQGAN, list[dict]]:
    """Train only the decoder half of a trained MoVQGAN on its own (frozen) codes.

    budget_seconds: a wall-clock budget on a shared machine, where steps/s is unknown in advance:
    the learning rate follows its warmup + cosine over whichever of steps or time runs out first,
    so the run ends on time with the rate annealed (the curve records the steps reached).

    keep_codes, keep_weight: code grids a transformer decoder generated (generated_codes.py). Each
    step also decodes `batch` windows of them and adds keep_weight x the same loss (L1 + MSE +
    edge_weight x gradient L1) against the picture `keep_reference`'s decoder half (default:
    init_from's) draws of them: sharper pictures of real codes, without drawing the generated ones
    differently (docs/assets.md step 30: a sharper decoder half drew their backgrounds with edges
    the maps do not have). keep_reference must hold the same codebook (same_codes).

    canny_weight: adds canny_weight x canny_l1 on the real pictures' windows: the Sobel responses
    canny reads, matched on the pixels near the picture's own canny edges (where exact-pixel canny
    F1, bench/eval_ceiling's figure, is decided). Not on the generated windows: those keep their
    reference's drawing, edges included."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = load_movqgan(init_from, preset).train()
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(FROZEN_PREFIXES))
        if p.requires_grad:
            trainable.append(p)
    # seeds apart from train()'s pools, so the fine-tune sees scenes the first training did not
    pools = [image_pool(pool_size // 2, 64, first_seed=1_000_000 + seed * 100_000),
             image_pool(pool_size // 2, 128, first_seed=1_000_000 + seed * 100_000 + pool_size)]
    codes = [pool_codes(model, p) for p in pools]  # no dropout or batch norm: train mode encodes alike
    reference = None
    if keep_weight:
        if keep_codes is None:
            raise ValueError("keep_weight needs keep_codes: the generated code grids to keep drawn alike")
        reference = load_movqgan(keep_reference or init_from, preset).eval().requires_grad_(False)
    opt = torch.optim.Adam(trainable, lr=lr, betas=(0.5, 0.9), foreach=True)
    curve, acc, t0, reached = [], {"rec": 0.0, "edge": 0.0}, time.perf_counter(), 0
    if reference is not None:
        acc["keep"] = 0.0
    if canny_weight:
        acc["canny"] = 0.0
    for step in range(1, steps + 1):
        done = _progress(step, steps, t0, budget_seconds)
        if done > 1.0:
            break
        reached = step
        for g in opt.param_groups:
            g["lr"] = _warmup_cosine(lr, done)
        c, x = _code_windows(pools[step % 2], codes[step % 2], rng, batch, window)
        pred = _render(model, c)
        rec, edge = _pixel_losses(pred, x)
        loss = rec + edge_weight * edge
        if canny_weight:
            near = canny_l1(pred, x, canny_weights(x))
            loss = loss + canny_weight * near
            acc["canny"] += near.item()
        if reference is not None:
            g, _ = _windows(keep_codes, rng, batch, window)
            with torch.no_grad():
                target = _render(reference, g)
            keep_rec, keep_edge = _pixel_losses(_render(model, g), target)
            keep = keep_rec + edge_weight * keep_edge
            loss = loss + keep_weight * keep
            acc["keep"] += keep.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc["rec"] += rec.item()
        acc["edge"] += edge.item()
        if step % log_every == 0 or step == steps:
            _log_row(curve, acc, step, log_every, lr=round(opt.param_groups[0]["lr"], 7), t0=t0)
    if reached % log_every and reached != steps:  # stopped by the budget between two rows
        _log_row(curve, acc, reached, log_every, lr=round(opt.param_groups[0]["lr"], 7), t0=t0)
    return model.eval(), curve


def _log_row(curve: list[dict], acc: dict, step: int, log_every: int, t0: float, **extra) -> None:
    """Append the means since the last row to the curve, log it, and reset the sums."""
    n = log_every if step % log_every == 0 else step % log_every
    row = {"step": step, **{k: round(v / n, 5) for k, v in acc.items()}, **extra,
           "seconds": round(time.perf_counter() - t0, 1)}
    curve.append(row)
    log.info("step %d %s", step, row)
    acc.update(dict.fromkeys(acc, 0.0))


def same_codes(a: str | Path, b: str | Path) -> bool:
    """Whether two MoVQGAN files hold bit-identical encoder, quant_conv and codebook weights."""
    sa, sb = read_state_dict(a), read_state_dict(b)
    keys = [k for k in sa if k.startswith(FROZEN_PREFIXES)]
    return bool(keys) and all(k in sb and sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in keys)


def repoint_decoder(decoder_dir: str | Path, old: str | Path, new: str | Path) -> dict:
    """Let a transformer decoder trained on `old`'s codes run with `new`, a MoVQGAN with the very
    same encoder and codebook (a --freeze-codes fine-tune): rewrites the MoVQGAN sha256 that the
    decoder's panelforge.json records (generate checks it) and keeps the old one beside it.
    Refused when the decoder did not learn `old`'s codes or when `new` would encode differently."""
    from storage.hashing import file_sha256

    meta_path = Path(decoder_dir) / "panelforge.json"
    meta = json.loads(meta_path.read_text())
    recorded = (meta.get("movqgan") or {}).get("sha256")
    if recorded != file_sha256(str(old)):
        raise ValueError(f"{meta_path}: records MoVQGAN sha256 {str(recorded)[:12]}..., not that of {old}: "
                         "the decoder did not learn its codes; retrain the decoder instead")
    if not same_codes(old, new):
        raise ValueError(f"{new}: encoder or codebook differ from {old}, so its codes differ: retrain the decoder")
    meta["movqgan"] = {**meta["movqgan"], "sha256": file_sha256(str(new)),
                       "codes_same_as_sha256": meta["movqgan"].get("codes_same_as_sha256", recorded)}
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta["movqgan"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * math.log10(255.0 ** 2 / max(mse, 1e-10)))


def train(preset: str = "tiny", steps: int = 800, batch: int = 8, crop: int = 32, lr: float = 2e-3,
          pool_size: int = 384, seed: int = 0, threads: int = 1, restart_every: int = 50,
          log_every: int = 50, init_from: str | None = None, edge_weight: float = 0.0,
          budget_seconds: float | None = None, context_weight: float = 0.0,
          codes: int | None = None) -> tuple[MoVQGAN, list[dict]]:
    """Returns the trained model (eval mode) and the loss curve (one dict per log_every steps).

    From scratch by default. init_from: go on training a trained MoVQGAN, every part of it (so
    its codes change: a transformer decoder trained on the old ones must learn the new ones).
    edge_weight: adds the image-gradient L1 (gradient_l1). budget_seconds: end after this wall time,
    with the learning rate's warmup and cosine spread over whichever of steps or time runs out first
    (as finetune_decoder); dead codes are restarted over the first 80% of the run.
    context_weight: train on whole pool images instead of crops, each beside a copy with one half
    from other images, with this weight on the squared difference of the kept half's latents
    (before quantization, relative to their variance), so that a panel's codes depend less on the
    panel beside it (the encoder's GroupNorm statistics and attention span the whole picture).
    `batch` then counts both copies: batch // 2 pictures, each encoded twice.
    codes: with init_from, grow the codebook to this many entries (grow_codebook); the new ones are
    restarted on encoder outputs before the first step and whenever unused, like any dead code."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    trng = torch.Generator().manual_seed(seed)
    # Half the scenes at 64 px, half at 128 px: small crops then hold shape edges as often as flat
    # background, and the model sees the demo's sizes of shapes.
    pools = [image_pool(pool_size // 2, 64, first_seed=seed * 100_000),
             image_pool(pool_size // 2, 128, first_seed=seed * 100_000 + pool_size)]
    model = (load_movqgan(init_from, preset) if init_from else MoVQGAN(preset)).train()
    grown_from = model.n_embed
    if codes is not None:
        if not init_from:
            raise ValueError("codes: give --init-from (from scratch, choose the preset's codebook)")
        model = grow_codebook(model, codes)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9), foreach=True)  # MoVQGAN's betas
    # OneCycle as the first trainings; a time budget (or a run too short for OneCycle's phases, which
    # divides by zero at 10 steps) anneals by hand below
    sched = None if budget_seconds or steps < 20 else torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    # Entries far from every encoder output (usage 0) start on one: all of a new model's (the
    # uniform(+-1/n) init), a grown codebook's new ones.
    placed = torch.ones(model.n_embed)
    placed[grown_from if init_from else 0:] = 0
    if not placed.all():
        with torch.no_grad():
            z = model.quant_conv(model.encoder(torch.cat([_batch(p, rng, batch * 2, crop) for p in pools])))
            _restart_dead_codes(model, z, placed, trng)
    usage = torch.zeros(model.n_embed)
    curve, acc, t0 = [], {"rec": 0.0, "codebook": 0.0, "commit": 0.0}, time.perf_counter()
    if edge_weight:
        acc["edge"] = 0.0
    if context_weight:
        acc["context"] = 0.0
    reached = 0
    for step in range(1, steps + 1):
        done = _progress(step, steps, t0, budget_seconds)
        if done > 1.0:
            break
        reached = step
        if sched is None:
            for g in opt.param_groups:
                g["lr"] = _warmup_cosine(lr, done)
        if context_weight:
            x, keep = _context_batch(pools[step % 2], rng, max(1, batch // 2))
        else:
            x = _batch(pools[step % 2], rng, batch, crop)
        out = model(x)
        rec = F.l1_loss(out.recon, x) + F.mse_loss(out.recon, x)
        loss = rec + out.codebook_loss + 0.25 * out.commit_loss
        if context_weight:
            z, half = out.latent, out.latent.shape[2] // 2
            rows = slice(0, half) if keep == 0 else slice(half, None)
            a, b = z[: len(z) // 2, :, rows], z[len(z) // 2:, :, rows]
            context = F.mse_loss(a, b) / z.detach().var()  # relative: shrinking z would not lower it
            loss = loss + context_weight * context
            acc["context"] += context.item()
        if edge_weight:
            edge = gradient_l1(out.recon, x)
            loss = loss + edge_weight * edge
            acc["edge"] += edge.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        usage += torch.bincount(out.codes.flatten(), minlength=model.n_embed)
        acc["rec"] += rec.item()
        acc["codebook"] += out.codebook_loss.item()
        acc["commit"] += out.commit_loss.item()
        if step % restart_every == 0 and done < 0.8:
            with torch.no_grad():
                z = model.quant_conv(model.encoder(x))
            _restart_dead_codes(model, z, usage, trng)
            usage.zero_()
        if step % log_every == 0 or step == steps:
            _log_row(curve, acc, step, log_every, t0=t0)
    if reached % log_every and reached != steps:  # stopped by the budget between two rows
        _log_row(curve, acc, reached, log_every, t0=t0)
    return model.eval(), curve


def evaluate(model: MoVQGAN, count: int = 16, size: int = 128, first_seed: int = 10_000_000) -> dict:
    """PSNR and code usage on held-out scenes (seeds the training never saw)."""
    imgs = image_pool(count, size, first_seed)
    codes = model.encode(imgs)
    recon = to_uint8(model.decode(codes))
    return {"psnr": round(float(np.mean([psnr(a, b) for a, b in zip(imgs, recon)])), 2),
            "codes_used": int(torch.unique(codes).numel()), "images": count, "size": size}, imgs, recon


def save_preview(originals: np.ndarray, recon: np.ndarray, path: str | Path, count: int = 8) -> None:
    """Originals on the top row, reconstructions under them."""
    from PIL import Image

    top = np.concatenate(list(originals[:count]), axis=1)
    bottom = np.concatenate(list(recon[:count]), axis=1)
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(str(path))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pool", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init-from", default=None,
                    help="a trained MoVQGAN to start from: all of it trains (new codes), or its decoder half "
                         "with --freeze-codes")
    ap.add_argument("--freeze-codes", action="store_true", help="train only the decoder half: codes stay the same")
    ap.add_argument("--edge-weight", type=float, default=1.0, help="weight of the image-gradient L1 (with --init-from)")
    ap.add_argument("--canny-weight", type=float, default=0.0,
                    help="weight of the Sobel L1 near the pictures' canny edges (with --freeze-codes)")
    ap.add_argument("--context-weight", type=float, default=0.0,
                    help="train on whole images, each beside a copy with one half from other images, with this "
                         "weight on the latents' difference in the kept half (codes that depend less on context)")
    ap.add_argument("--codes", type=int, default=None,
                    help="with --init-from (all of it training): grow the codebook to this many entries")
    ap.add_argument("--window", type=int, default=8, help="code windows the decoder trains on (--freeze-codes)")
    ap.add_argument("--keep-codes", default=None, metavar="FILE",
                    help="with --freeze-codes: generated code grids (tasks.assets.generated_codes) to keep drawn "
                         "as --keep-reference draws them")
    ap.add_argument("--keep-weight", type=float, default=1.0, help="weight of the --keep-codes loss")
    ap.add_argument("--keep-reference", default=None, metavar="MOVQGAN",
                    help="whose drawing of --keep-codes to keep (default --init-from); same codebook")
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="end after this wall time (learning rate annealed over it) or --steps")
    ap.add_argument("--repoint-decoder", default=None, metavar="FOLDER",
                    help="after --freeze-codes: let this decoder (trained on --init-from's codes) use --out")
    ap.add_argument("--out", default="assets/movqgan-tiny.safetensors")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored weights")
    ap.add_argument("--preview", default=None, help="PNG: held-out originals over reconstructions")
    ap.add_argument("--curve", default=None, help="JSON: the loss curve and the evaluation")
    a = ap.parse_args(argv)
    for flag, value in (("--edge-weight", a.edge_weight), ("--context-weight", a.context_weight),
                        ("--keep-weight", a.keep_weight), ("--canny-weight", a.canny_weight)):
        if value < 0:
            ap.error(f"{flag} {value}: a loss weight is 0 or more")
    if a.canny_weight and not a.freeze_codes:
        ap.error("--canny-weight trains the decoder half on its frozen codes: give --freeze-codes")
    if a.keep_codes and not a.freeze_codes:
        ap.error("--keep-codes trains the decoder half on generated codes: give --freeze-codes")
    if a.codes is not None and (a.freeze_codes or not a.init_from):
        ap.error("--codes grows a trained MoVQGAN's codebook: give --init-from, without --freeze-codes")
    if a.codes is not None and a.codes < 2:
        ap.error(f"--codes {a.codes}: a codebook has 2 entries or more")
    if a.budget_seconds is not None and a.budget_seconds <= 0:
        ap.error(f"--budget-seconds {a.budget_seconds}: give a positive wall time, or leave it out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    meta = {}
    if a.freeze_codes:
        if not a.init_from:
            ap.error("--freeze-codes needs --init-from: the MoVQGAN whose codes to keep")
        if Path(a.out).resolve() == Path(a.init_from).resolve():
            ap.error("--out is --init-from: write elsewhere (the codes are checked against --init-from), then move")
        keep_codes = None
        if a.keep_codes:
            if a.keep_reference and not same_codes(a.init_from, a.keep_reference):
                ap.error(f"--keep-reference {a.keep_reference}: its codebook is not --init-from's, so the "
                         "generated codes would mean other pictures to it")
            try:
                keep_codes = load_keep_codes(a.keep_codes)
            except (OSError, ValueError) as e:
                ap.error(f"--keep-codes {a.keep_codes}: {e}")
        elif a.keep_reference:
            ap.error("--keep-reference needs --keep-codes: the generated code grids to keep drawn alike")
        model, curve = finetune_decoder(a.init_from, a.preset, a.steps, a.batch, a.window, a.lr, a.edge_weight,
                                        a.pool, a.seed, a.threads, budget_seconds=a.budget_seconds,
                                        keep_codes=keep_codes, keep_weight=a.keep_weight if a.keep_codes else 0.0,
                                        keep_reference=a.keep_reference, canny_weight=a.canny_weight)
        meta["steps_reached"] = curve[-1]["step"] if curve else 0
        meta["budget_seconds"] = a.budget_seconds
        if a.keep_codes:
            meta.update(keep_codes=Path(a.keep_codes).name, keep_grids=len(keep_codes), keep_weight=a.keep_weight,
                        keep_reference=Path(a.keep_reference or a.init_from).name)
    else:
        model, curve = train(a.preset, a.steps, a.batch, a.crop, a.lr, a.pool, a.seed, a.threads,
                             init_from=a.init_from, edge_weight=a.edge_weight if a.init_from else 0.0,
                             budget_seconds=a.budget_seconds, context_weight=a.context_weight, codes=a.codes)
        if a.budget_seconds:
            meta["steps_reached"] = curve[-1]["step"] if curve else 0
            meta["budget_seconds"] = a.budget_seconds
    seconds = time.perf_counter() - t0
    metrics, imgs, recon = evaluate(model)
    meta = {**meta, "trained_by": "tasks/assets/train_movqgan.py", "steps": a.steps, "batch": a.batch, "crop": a.crop,
            "seed": a.seed, "psnr_heldout_128px": metrics["psnr"], "train_seconds": round(seconds)}
    if a.init_from and not a.freeze_codes:
        meta.update(finetuned_from=Path(a.init_from).name, edge_weight=a.edge_weight, lr=a.lr,
                    context_weight=a.context_weight, **({"codes_grown_to": a.codes} if a.codes else {}))
    if a.freeze_codes:
        meta.update(decoder_finetuned_from=Path(a.init_from).name, window=a.window, edge_weight=a.edge_weight,
                    **({"canny_weight": a.canny_weight} if a.canny_weight else {}))
        meta.pop("crop")
    save_movqgan(model, a.out, dtype=getattr(torch, a.dtype), meta=meta)
    if a.freeze_codes and not same_codes(a.init_from, a.out):
        raise SystemExit(f"{a.out}: the encoder or codebook differ from {a.init_from}: the codes would change")
    if a.repoint_decoder:
        if not a.freeze_codes:
            ap.error("--repoint-decoder needs --freeze-codes: other codes need a retrained decoder")
        repoint_decoder(a.repoint_decoder, a.init_from, a.out)
    if a.preview:
        save_preview(imgs, recon, a.preview)
    if a.curve:
        Path(a.curve).write_text(json.dumps({"curve": curve, "eval": metrics, "meta": meta}, indent=1))
    print(json.dumps({"out": a.out, "parameters": count_parameters(model), **metrics, "train_seconds": round(seconds)}))


if __name__ == "__main__":
    main()
