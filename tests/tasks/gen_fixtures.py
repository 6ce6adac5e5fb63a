"""Helpers for the bulk-generation tests: small random checkpoints in the real formats, configs,
and a stand-in engine with model/engine.py's interface, used only where a test needs outputs it
controls (which best-of-N sample wins, an engine error); the job tests run the real Engine."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

TINY_DECODER = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=128, max_seq_len=512)


def write_tiny_models(folder: Path) -> tuple[str, str, str]:
    """A random tiny decoder (transformers folder), a random tiny MoVQGAN (safetensors) and a
    shapes tokenizer trained on shapes captions: (decoder folder, movqgan file, tokenizer file)."""
    import torch

    from model.decoder import Decoder, ModelArgs
    from model.hf_checkpoint import save_decoder
    from model.layout import Layout
    from model.movqgan import MoVQGAN, save_movqgan

    folder.mkdir(parents=True, exist_ok=True)
    from model.text_tokenizer import train_bpe
    from tasks.shapes.scenes import caption_of, sample_spec

    dec_dir, movq_path, tok_path = folder / "decoder", folder / "movqgan-tiny.safetensors", folder / "shapes-tokenizer.json"
    if not (dec_dir / "config.json").is_file():
        train_bpe([caption_of(sample_spec(i)) for i in range(300)], vocab_size=400).save(str(tok_path))
        torch.manual_seed(0)
        layout = Layout.shapes(str(tok_path))
        model = Decoder(ModelArgs.from_name("tiny", vocab_size=layout.vocab_size, **TINY_DECODER))
        save_decoder(model, dec_dir, meta={"preset": "tiny", "layout": layout.meta()})
        save_movqgan(MoVQGAN.from_preset("tiny"), movq_path)
    return str(dec_dir), str(movq_path), str(tok_path)


def write_config(tmp: Path, models: tuple[str, str, str], generate: dict, ray: dict | None = None) -> Path:
    """A config file for a small job under tmp/work (sampling kept cheap: small top-k, 64 px)."""
    gen = {"size": "64x64", "top_k": 64, "sjd_window": 4, "pairs_per_unit": 4, "max_batch": 4, "workers": 1}
    gen.update(generate)
    data = {
        "name": "gen-test",
        "workdir": str(tmp / "work"),
        "ray": ray or {"num_cpus": 2},
        "models": {"movqgan_preset": "tiny", "movqgan_path": models[1], "tokenizer": "shapes", "tokenizer_path": models[2],
                   "decoder_preset": "tiny", "decoder_path": models[0]},
        "generate": gen,
    }
    path = tmp / "gen.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def engine_types():
    """Request and Result of model/engine.py."""
    from model.engine import Request, Result

    return Request, Result


class StandInEngine:
    """Same interface as model.engine.Engine: codes drawn from the request's seed (the upper
    panel copied from upper_codes), an error for requests taller than `max_height`."""

    def __init__(self, codebook: int, max_height: int = 256, lower_from_upper: bool = False):
        self.codebook, self.max_height, self.lower_from_upper = codebook, max_height, lower_from_upper
        self.seen: list = []

    def generate(self, requests):
        _, Result = engine_types()
        for r in requests:
            self.seen.append(r)
            t0 = time.perf_counter()
            if r.height > self.max_height:
                yield Result(r.id, None, 0, 0, 0.0, f"height {r.height} exceeds the context")
                continue
            rows, cols = r.height // 8, r.width // 8
            codes = np.random.default_rng(r.seed).integers(0, self.codebook, (rows, cols))
            if r.upper_codes is not None:
                codes[: rows // 2] = r.upper_codes
                if self.lower_from_upper and r.seed % 2 == 0:
                    codes[rows // 2 :] = r.upper_codes
            yield Result(r.id, codes, steps=rows * cols // 2, tokens=rows * cols, seconds=time.perf_counter() - t0, error=None)


@dataclass
class FixedScorer:
    """A scorer whose score is a function of the lower panel's mean: lets a test know the best."""

    name: str = "mean"
    higher_is_better: bool = True

    def applies(self, task: str) -> bool:
        return task.startswith("control:")

    def score(self, task, upper, lower, caption=""):
        return float(np.asarray(lower, np.float64).mean())
