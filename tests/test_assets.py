"""The shipped small models match their recorded fingerprints, fit the size budget, and load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_assets_match_their_fingerprints():
    recorded = json.loads((ASSETS / "fingerprints.json").read_text())
    shipped = sorted(str(p.relative_to(ASSETS)) for p in ASSETS.rglob("*") if p.is_file() and p.name != "fingerprints.json")
    assert sorted(recorded) == shipped
    for name, digest in recorded.items():
        assert hashlib.sha256((ASSETS / name).read_bytes()).hexdigest() == digest, f"assets/{name} changed"
    assert sum((ASSETS / n).stat().st_size for n in recorded) <= 20 * 2**20


def test_shipped_models_load_together():
    from model.hf_checkpoint import load_decoder
    from model.layout import Layout
    from model.movqgan import load_movqgan

    layout = Layout.shapes()
    decoder, meta = load_decoder(ASSETS / "decoder-tiny")
    assert meta["layout_fingerprint"] == layout.fingerprint
    assert decoder.tok_embeddings.weight.shape[0] == layout.vocab_size
    movq = load_movqgan(ASSETS / "movqgan-tiny.safetensors", "tiny")
    assert movq.quantize.embedding.weight.shape[0] == layout.codebook_size
