"""Carry a trained decoder over to a new MoVQGAN's codes, so that it need not learn them from nothing.

    python -m tasks.assets.translate_codes --decoder assets/decoder-tiny \
        --old assets/movqgan-tiny.safetensors --new out/movq-new.safetensors --out out/decoder-translated

A decoder knows one MoVQGAN's codes: its embedding and output-head rows for code i are what it has
learned about the patches code i stands for. A new MoVQGAN (trained further, or with a larger
codebook) encodes the same patches with other codes, and until now the decoder had to be trained
again for several legs before it drew as well as it did (docs/assets.md, steps 16-21). Both
MoVQGANs encode the same pictures here (shapes scenes and their control maps, as the tokenizer
was trained on), position by position, and each new code's rows start as the mean of the old
codes' rows it replaces, weighted by how often it replaces each; a new code that never occurs
keeps the old row of its index (or the old codes' mean past the old codebook). The rest of the
decoder is copied. The result is a decoder folder for the new MoVQGAN's layout (a larger
codebook widens the vocabulary), recording the new MoVQGAN's sha256, ready for
`train.init_from`: training then starts from what the decoder knew, not from 6.9 nats a code.

Only the shapes layout, where the codes are the vocabulary's last rows, can grow its codebook;
a layout of the same size keeps every other row where it was.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.decoder import Decoder
from model.hf_checkpoint import load_decoder, save_decoder
from model.layout import Layout
from model.movqgan import MoVQGAN, load_movqgan
from storage.hashing import file_sha256

CODE_ROWS = ("tok_embeddings.weight", "output.weight")  # the decoder's rows indexed by token id


def code_counts(old: MoVQGAN, new: MoVQGAN, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """[new.n_embed, old.n_embed] float: how often each new code stands where each old code stood,
    over every code position of `images` (uint8 [N, H, W, 3], both models encode all of them)."""
    counts = torch.zeros(new.n_embed * old.n_embed, dtype=torch.float64)
    for i in range(0, len(images), batch):
        a, b = old.encode(images[i:i + batch]).flatten(), new.encode(images[i:i + batch]).flatten()
        counts += torch.bincount(b * old.n_embed + a, minlength=counts.numel()).double()
    return counts.view(new.n_embed, old.n_embed).float()


def translate_rows(rows: torch.Tensor, offset: int, counts: torch.Tensor) -> torch.Tensor:
    """A [V, D] weight whose rows offset..offset+n_old are the old codes', with those rows replaced
    by n_new rows: each new code's the count-weighted mean of the old codes' it replaces."""
    n_new, n_old = counts.shape
    if offset + n_old > rows.shape[0]:
        raise ValueError(f"codes {offset}..{offset + n_old - 1} lie past the {rows.shape[0]} rows")
    if n_new != n_old and offset + n_old != rows.shape[0]:
        raise ValueError("the codebook can change size only where the codes are the vocabulary's last rows")
    old = rows[offset:offset + n_old].float()
    seen = counts.sum(1)
    mixed = (counts / seen.clamp(min=1)[:, None]) @ old
    fill = torch.cat([old, old.mean(0, keepdim=True).expand(max(0, n_new - n_old), -1)])[:n_new]
    new = torch.where((seen > 0)[:, None], mixed, fill).to(rows.dtype)
    return torch.cat([rows[:offset], new, rows[offset + n_old:]])


def translate_decoder(decoder: str | Path, old_path: str | Path, new_path: str | Path, out: str | Path,
                      images: np.ndarray, preset: str = "tiny", threads: int | None = None) -> dict:
    """Write `out`: `decoder` (trained on old_path's codes) with its code rows translated to
    new_path's codes. Returns what it records, with the share of positions whose code index
    is unchanged and the new codes seen."""
    if threads:
        torch.set_num_threads(threads)
    model, meta = load_decoder(decoder)
    dtype = model.output.weight.dtype  # the stored one, kept
    model = model.float()
    recorded = (meta.get("movqgan") or {}).get("sha256")
    old_sha = file_sha256(str(old_path))
    if recorded and recorded != old_sha:
        raise ValueError(f"{decoder}: records MoVQGAN sha256 {recorded[:12]}..., not that of {old_path}: "
                         "give the MoVQGAN whose codes it learned as --old")
    lay = meta.get("layout") or {}
    if lay.get("layout") != "shapes":
        raise ValueError(f"{decoder}: layout {lay.get('layout')!r}; translation is for the shapes layout")
    old_m, new_m = load_movqgan(old_path, preset), load_movqgan(new_path, preset)
    if lay.get("codebook_size") != old_m.n_embed:
        raise ValueError(f"{decoder}: learned {lay.get('codebook_size')} codes, {old_path} has {old_m.n_embed}")
    layout = Layout.shapes(codebook_size=new_m.n_embed)
    if layout.code_offset != lay.get("code_offset"):
        raise ValueError(f"{decoder}: codes at {lay.get('code_offset')}, the shapes layout has them at "
                         f"{layout.code_offset}")
    counts = code_counts(old_m, new_m, images)  # the one costly step, after every check
    sd = model.state_dict()
    for key in CODE_ROWS:
        sd[key] = translate_rows(sd[key], layout.code_offset, counts)
    with torch.device("meta"):
        grown = Decoder(replace(model.args, vocab_size=layout.vocab_size))
    grown.load_state_dict(sd, assign=True)
    positions = counts.sum().item()
    n = min(counts.shape)
    same = float(counts[:n, :n].diagonal().sum() / positions)
    note = {"decoder": str(decoder), "old_movqgan_sha256": old_sha, "images": int(len(images)),
            "positions": int(positions), "same_index": round(same, 4),
            "new_codes_seen": int((counts.sum(1) > 0).sum()), "old_codes_seen": int((counts.sum(0) > 0).sum())}
    new_meta = {k: v for k, v in meta.items() if k not in ("skipped_keys", "final_loss")}
    new_meta.update(layout=layout.meta(), layout_fingerprint=layout.fingerprint,
                    args={**(meta.get("args") or {}), "vocab_size": layout.vocab_size},
                    movqgan={"preset": preset, "weights": Path(new_path).name, "sha256": file_sha256(str(new_path))},
                    codes_translated=note)
    save_decoder(grown, out, new_meta, dtype=dtype)
    return note


def main(argv: list[str] | None = None) -> int:
    from tasks.assets.train_movqgan import image_pool

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--decoder", required=True, help="a decoder folder trained on --old's codes")
    ap.add_argument("--old", required=True, help="the MoVQGAN whose codes the decoder learned")
    ap.add_argument("--new", required=True, help="the MoVQGAN to carry the decoder over to")
    ap.add_argument("--out", required=True, help="the new decoder folder (must not exist)")
    ap.add_argument("--images", type=int, default=1024, help="pictures both MoVQGANs encode (default 1024)")
    ap.add_argument("--size", type=int, default=128, help="their side in pixels (default 128)")
    ap.add_argument("--seed", type=int, default=30_000_000, help="the first scene seed")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    if a.images < 1 or a.size < 8 or a.size % 8:
        ap.error("--images 1 or more, --size a multiple of 8")
    if Path(a.out).exists():
        ap.error(f"--out {a.out} exists: give a new folder")
    for flag in ("decoder", "old", "new"):
        if not Path(getattr(a, flag)).exists():
            ap.error(f"--{flag} {getattr(a, flag)}: not found")
    try:
        note = translate_decoder(a.decoder, a.old, a.new, a.out, image_pool(a.images, a.size, a.seed),
                                 a.preset, a.threads)
    except ValueError as e:
        ap.error(str(e))
    print(json.dumps({"out": a.out, **note}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
