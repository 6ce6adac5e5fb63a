"""Train the tiny MoVQGAN on the shapes source: the image tokenizer the demo ships.

    python -m tasks.train_movqgan --steps 800 --out assets/movqgan-tiny.safetensors --preview /tmp/movq-recon.png

Images: shapes scenes rendered by tasks/shapes.py plus the control maps the panels hold (canny,
soft edge, depth), so the tokenizer sees everything the demo encodes. Random crops and flips.
Losses: L1 + MSE reconstruction, codebook ||sg(z) - e||^2 and commitment 0.25 ||z - sg(e)||^2
(VQ-VAE eq. 3). The official MoVQGAN also trains with LPIPS and a patch GAN; for flat-coloured
shapes the pixel losses are enough and keep training to minutes on one CPU core. The codebook
starts from encoder outputs and codes unused for a while are restarted on current ones (dead-code
restart, as in Jukebox / improved VQGAN training), so a small budget still uses most codes.
One thread by default: the development machines are shared.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.movqgan import MoVQGAN, count_parameters, save_movqgan, to_uint8
from tasks.annotators import canny, soft_edge
from tasks.shapes import render_scene

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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * math.log10(255.0 ** 2 / max(mse, 1e-10)))


def train(preset: str = "tiny", steps: int = 800, batch: int = 8, crop: int = 32, lr: float = 2e-3,
          pool_size: int = 384, seed: int = 0, threads: int = 1, restart_every: int = 50,
          log_every: int = 50) -> tuple[MoVQGAN, list[dict]]:
    """Returns the trained model (eval mode) and the loss curve (one dict per log_every steps)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    trng = torch.Generator().manual_seed(seed)
    # Half the scenes at 64 px, half at 128 px: small crops then hold shape edges as often as flat
    # background, and the model sees the demo's sizes of shapes.
    pools = [image_pool(pool_size // 2, 64, first_seed=seed * 100_000),
             image_pool(pool_size // 2, 128, first_seed=seed * 100_000 + pool_size)]
    model = MoVQGAN(preset).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9), foreach=True)  # MoVQGAN's betas
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    with torch.no_grad():  # codebook from data: the uniform(+-1/n) init sits far from the encoder outputs
        z = model.quant_conv(model.encoder(torch.cat([_batch(p, rng, batch * 2, crop) for p in pools])))
        _restart_dead_codes(model, z, torch.zeros(model.n_embed), trng)
    usage = torch.zeros(model.n_embed)
    curve, acc, t0 = [], {"rec": 0.0, "codebook": 0.0, "commit": 0.0}, time.perf_counter()
    for step in range(1, steps + 1):
        x = _batch(pools[step % 2], rng, batch, crop)
        out = model(x)
        rec = F.l1_loss(out.recon, x) + F.mse_loss(out.recon, x)
        loss = rec + out.codebook_loss + 0.25 * out.commit_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(out.codes.flatten(), minlength=model.n_embed)
        acc["rec"] += rec.item()
        acc["codebook"] += out.codebook_loss.item()
        acc["commit"] += out.commit_loss.item()
        if step % restart_every == 0 and step < steps * 0.8:
            with torch.no_grad():
                z = model.quant_conv(model.encoder(x))
            _restart_dead_codes(model, z, usage, trng)
            usage.zero_()
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            row = {"step": step, **{k: round(v / n, 5) for k, v in acc.items()},
                   "seconds": round(time.perf_counter() - t0, 1)}
            curve.append(row)
            log.info("step %d %s", step, row)
            acc = dict.fromkeys(acc, 0.0)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pool", type=int, default=384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="assets/movqgan-tiny.safetensors")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored weights")
    ap.add_argument("--preview", default=None, help="PNG: held-out originals over reconstructions")
    ap.add_argument("--curve", default=None, help="JSON: the loss curve and the evaluation")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    model, curve = train(a.preset, a.steps, a.batch, a.crop, a.lr, a.pool, a.seed, a.threads)
    seconds = time.perf_counter() - t0
    metrics, imgs, recon = evaluate(model)
    meta = {"trained_by": "tasks/train_movqgan.py", "steps": a.steps, "batch": a.batch, "crop": a.crop,
            "seed": a.seed, "psnr_heldout_128px": metrics["psnr"], "train_seconds": round(seconds)}
    save_movqgan(model, a.out, dtype=getattr(torch, a.dtype), meta=meta)
    if a.preview:
        save_preview(imgs, recon, a.preview)
    if a.curve:
        Path(a.curve).write_text(json.dumps({"curve": curve, "eval": metrics, "meta": meta}, indent=1))
    print(json.dumps({"out": a.out, "parameters": count_parameters(model), **metrics, "train_seconds": round(seconds)}))


if __name__ == "__main__":
    main()
