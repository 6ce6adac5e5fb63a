"""Train the demo's small text tokenizer on the shapes captions: assets/shapes-tokenizer.json.

    python -m tasks.assets.train_tokenizer assets/shapes-tokenizer.json

The corpus is every prompt the shapes source can yield (captions, edit instructions, subject
descriptions, rendered through each task's template at the demo's bucket sizes), built from fixed
seeds in a fixed order, so the file is byte-for-byte the same on every run. Byte-level BPE keeps any
other text encodable (a user prompt with an unseen word costs more tokens, never an error).
"""
from __future__ import annotations

import sys
from pathlib import Path

from model.buckets import buckets_for, panel_size
from model.prompts import CONTROL_NAMES, render_prompt
from model.text_tokenizer import SHAPES_TOKENIZER, train_bpe
from tasks.shapes.scenes import caption_of, edit_pair, sample_spec, subject_pair

VOCAB_SIZE = 640


def corpus(scenes: int = 1500, pairs: int = 300, stages: tuple[int, ...] = (64, 128, 256)) -> list[str]:
    """The prompts, deterministic: scene seeds 0..scenes-1, pair seeds 0..pairs-1."""
    sizes = [b for s in stages for b in buckets_for(s)]
    tasks = ["t2i"] + [f"{k}:{m}" for k in ("control", "dense") for m in CONTROL_NAMES]
    texts = []
    for seed in range(scenes):
        w, h = sizes[seed % len(sizes)]
        task = tasks[seed % len(tasks)]
        texts.append(render_prompt(task, w, h, caption_of(sample_spec(seed)), sized=seed % 10 != 9))
    for seed in range(pairs):
        w, h = sizes[seed % len(sizes)]
        pw, ph = panel_size((w, h), dual=True)
        e = edit_pair(seed, 32, 32)  # the text does not depend on the size: render small
        texts.append(render_prompt("edit", w, h, e.source.caption, instruction=e.instruction))
        s = subject_pair(seed, 32, 32)
        texts.append(render_prompt("subject", w, h, s.scene.caption, subject=s.description))
    return texts


def train(out: str | Path = SHAPES_TOKENIZER, vocab_size: int = VOCAB_SIZE) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = train_bpe(corpus(), vocab_size=vocab_size)
    tok.save(str(out))
    return out


if __name__ == "__main__":
    path = train(sys.argv[1] if len(sys.argv) > 1 else SHAPES_TOKENIZER)
    print(f"wrote {path} ({path.stat().st_size} bytes)")
