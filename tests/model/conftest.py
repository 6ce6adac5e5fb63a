"""Fixtures of the decoder/engine tests: random tiny decoders, their transformers twin, a small layout.

    .venv/bin/python -m pytest -q tests/model/test_decoder.py tests/model/test_engine.py
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.decoder import Decoder, ModelArgs
from model.hf_checkpoint import args_to_hf_config, to_hf_state_dict

TINY = dict(vocab_size=96, dim=64, n_layers=2, n_heads=4, intermediate_size=160, max_seq_len=128)


class SmallLayout:
    """A stand-in with model/layout.py's interface and ids (16 codes, sizes up to 256 px), so the
    engine tests need no trained tokenizer and the statistics run over a small codebook."""

    bos, turn_end, image_start, image_end, row_end = 1, 2, 3, 4, 5
    size_base = 6  # size token of n * 32 px is size_base + n, n = 1..8
    code_offset, codebook_size, patch = 20, 16, 8
    vocab_size = 36
    fingerprint = "small-test-layout"

    def is_code(self, token_id):
        return (token_id >= self.code_offset) & (token_id < self.code_offset + self.codebook_size)

    def size_tokens(self, height_px, width_px):
        for px in (height_px, width_px):
            if px <= 0 or px % 32 or px > 256:
                raise ValueError(f"size {px} px: expected a multiple of 32 up to 256")
        return self.size_base + height_px // 32, self.size_base + width_px // 32

    def image_prefix(self, height_px, width_px):
        return [self.image_start, *self.size_tokens(height_px, width_px)]

    def encode_prompt(self, text):
        return [self.bos, *(10 + (ord(c) % 8) for c in text), self.turn_end]

    def parse_image(self, ids):
        a = np.asarray(ids, dtype=np.int64)
        s = int(np.flatnonzero(a == self.image_start)[0])
        rows, cols = (int(a[s + 1]) - self.size_base) * 4, (int(a[s + 2]) - self.size_base) * 4
        body = a[s + 3: s + 3 + rows * (cols + 1)].reshape(rows, cols + 1)
        if (body[:, -1] != self.row_end).any() or not self.is_code(body[:, :-1]).all():
            raise ValueError("malformed image")
        if a[s + 3 + rows * (cols + 1)] != self.image_end:
            raise ValueError("no image end")
        return body[:, :-1] - self.code_offset


@pytest.fixture
def small_layout():
    return SmallLayout()


def randomized_decoder(args: ModelArgs, seed: int = 0, scale: float = 0.15) -> Decoder:
    """A decoder whose norms, biases and weights are all random (so a swapped key shows up)."""
    torch.manual_seed(seed)
    model = Decoder(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, scale)
    return model.eval()


@pytest.fixture
def random_decoder():
    return randomized_decoder


@pytest.fixture
def engine_model(small_layout):
    """The small random decoder the engine tests generate with (peaked enough that SJD accepts)."""
    args = ModelArgs(vocab_size=small_layout.vocab_size, dim=64, n_layers=2, n_heads=4, intermediate_size=160,
                     max_seq_len=256)
    return randomized_decoder(args, seed=2, scale=0.3)


@pytest.fixture
def tiny_args():
    return lambda **kw: ModelArgs(**{**TINY, **kw})


def _hf_twin(args: ModelArgs, ours: Decoder, cls_name: str = "ChameleonForConditionalGeneration"):
    import transformers

    cfg = transformers.ChameleonConfig(**{k: v for k, v in args_to_hf_config(args, torch.float32).items()
                                          if k not in ("architectures", "model_type", "torch_dtype")})
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls_name)(cfg).eval()
    hf_sd = to_hf_state_dict(ours.state_dict())
    if cls_name == "ChameleonModel":
        hf_sd = {k.removeprefix("model."): v for k, v in hf_sd.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    assert not unexpected
    assert all("vqmodel" in k for k in missing), missing
    return model


@pytest.fixture
def hf_twin():
    """transformers' Chameleon model holding the same weights as one of ours (eager attention, fp32)."""
    return _hf_twin


@pytest.fixture
def one_thread():
    """The 2-core machine is shared: two intra-op threads on tiny tensors spin and run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chi_square_p(counts: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """p-value of Pearson's chi-square goodness of fit, cells with small expectation pooled."""
    n = counts.sum()
    exp = expected_probs.double() * n
    order = torch.argsort(exp)
    c, e = counts.double()[order], exp[order]
    small = torch.cumsum(e, 0) < min_expected  # pool the smallest cells together
    pooled_c = torch.cat([c[small].sum()[None], c[~small]]) if small.any() else c
    pooled_e = torch.cat([e[small].sum()[None], e[~small]]) if small.any() else e
    keep = pooled_e > 0
    stat = ((pooled_c[keep] - pooled_e[keep]) ** 2 / pooled_e[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.fixture
def chi_square():
    return chi_square_p
