"""The token layout: round trips (property-based), malformed sequences, missing specials, fingerprint.

    .venv/bin/python -m pytest -q tests/model/test_layout.py
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.layout import Layout, LayoutError, RELEASE_CODE_OFFSET
from model.text_tokenizer import HFTokenizer, load_text_tokenizer, size_token_name, train_bpe

TEXTS = ["a red circle at the top left on a plain grey background", "make the blue square bigger",
         "Generate an image of 64x64 according to the following prompt:\na green star"]


@pytest.fixture(scope="module")
def shapes() -> Layout:
    return Layout.shapes()


@pytest.fixture(scope="module")
def release() -> Layout:
    return Layout.release()


def test_release_ids_are_the_known_ones(release):
    # REFERENCE.md: the three ids known from the release, and codes from 155000.
    assert (release.image_start, release.image_end, release.row_end) == (151665, 151666, 151670)
    assert release.code_offset == RELEASE_CODE_OFFSET and release.codebook_size == 16384
    assert release.is_code(155000) and release.is_code(171383) and not release.is_code(171384)
    tok = release.tokenizer
    h, w = release.size_tokens(768, 512)
    assert (h, w) == (tok.token_to_id("<reserved08824>"), tok.token_to_id("<reserved08816>"))
    assert release.turn_end == tok.token_to_id("<reserved08706>")


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 2**32 - 1),
       prompt=st.text(max_size=40), which=st.sampled_from(["shapes", "release"]))
def test_round_trip(shapes, release, rows, cols, seed, prompt, which):
    layout = shapes if which == "shapes" else release
    grid = np.random.default_rng(seed).integers(0, layout.codebook_size, (rows * 4, cols * 4))
    ids, loss_start = layout.encode_sample(prompt, grid)
    assert ids[0] == layout.bos and ids[loss_start - 1] == layout.turn_end
    assert ids[loss_start] == layout.image_start and ids[-2:] == [layout.image_end, layout.turn_end]
    assert len(ids) - loss_start == layout.image_length(rows * 32, cols * 32) + 1
    assert ids[loss_start + 1:loss_start + 3] == list(layout.size_tokens(rows * 32, cols * 32))
    np.testing.assert_array_equal(layout.parse_image(ids), grid)
    np.testing.assert_array_equal(layout.parse_image(ids[loss_start:]), grid)
    # Prompt text never produces an image token, a control token or a code.
    head = np.array(ids[1:loss_start - 1], dtype=np.int64)
    assert not layout.is_code(head).any()
    assert not np.isin(head, [layout.image_start, layout.image_end, layout.row_end, layout.turn_end]).any()


def test_special_token_text_stays_text(shapes, release):
    for layout in (shapes, release):
        ids = layout.encode_prompt("<racm3:break> <eoss> <reserved08706>")
        assert layout.image_start not in ids and layout.image_end not in ids and ids.count(layout.turn_end) == 1


@pytest.mark.parametrize("mutate, message", [
    (lambda a, s: a[:s], "no image start"),
    (lambda a, s: a[:-3], "truncated"),
    (lambda a, s: a[:s + 5] + [a[s + 5] if False else 0] + a[s + 6:], "is not an image code"),
    (lambda a, s: a[:s + 3 + 8] + [a[s + 3]] + a[s + 3 + 9:], "row end"),
    (lambda a, s: a[:s + 1] + [a[s + 3]] + a[s + 2:], "not size tokens"),
    (lambda a, s: a[:-2] + [a[s]] + a[-1:], "image end"),
])
def test_malformed_sequences_raise(shapes, mutate, message):
    grid = np.arange(8 * 8).reshape(8, 8) % shapes.codebook_size
    ids, start = shapes.encode_sample("a red circle", grid)
    bad = mutate(list(ids), start)
    with pytest.raises(LayoutError, match=message):
        shapes.parse_image(bad)


def test_bad_sizes_and_grids(shapes):
    with pytest.raises(LayoutError, match="multiple of 32"):
        shapes.size_tokens(100, 64)
    with pytest.raises(LayoutError, match="no size token"):
        shapes.size_tokens(32 * 200, 64)
    with pytest.raises(LayoutError, match="outside 0"):
        shapes.encode_sample("x", np.full((4, 4), shapes.codebook_size))
    with pytest.raises(LayoutError, match="multiple of 32"):
        shapes.encode_sample("x", np.zeros((6, 4), dtype=np.int64))  # 48 px tall


def _tokenizer_without(tmp_path, drop: set[str]) -> HFTokenizer:
    from model.text_tokenizer import SHAPES_SPECIALS

    tok = train_bpe(TEXTS * 3, vocab_size=300, specials=tuple(s for s in SHAPES_SPECIALS if s not in drop))
    path = tmp_path / "tok.json"
    tok.save(str(path))
    return HFTokenizer(path, kind="shapes")


def test_missing_special_tokens_are_named(tmp_path):
    tok = _tokenizer_without(tmp_path, {"<eoss>", "<reserved08799>"})
    with pytest.raises(LayoutError, match="<eoss>, <reserved08799>"):
        Layout(tok, len(tok), 64)


def test_missing_size_token_is_an_error_not_a_guess(tmp_path):
    tok = _tokenizer_without(tmp_path, {size_token_name(2)})  # 64 px
    layout = Layout(tok, len(tok), 64)
    assert layout.size_tokens(32, 96)
    with pytest.raises(LayoutError, match=r"<reserved08802>"):
        layout.size_tokens(64, 64)


def test_codes_overlapping_specials_rejected(shapes):
    with pytest.raises(LayoutError, match="code range"):
        Layout(shapes.tokenizer, 0, 1024)


def test_fingerprint_is_stable_and_sensitive(shapes, tmp_path):
    again = Layout(load_text_tokenizer("shapes", None), shapes.code_offset, shapes.codebook_size)
    assert again.fingerprint == shapes.fingerprint
    assert Layout(shapes.tokenizer, shapes.code_offset + 1, shapes.codebook_size).fingerprint != shapes.fingerprint
    assert Layout(shapes.tokenizer, shapes.code_offset, shapes.codebook_size * 2).fingerprint != shapes.fingerprint
    # A tokenizer with one more token in its vocabulary changes it too.
    data = json.loads(shapes.tokenizer.path.read_text())
    data["model"]["vocab"]["zzzz"] = max(data["model"]["vocab"].values()) + 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    changed = Layout(HFTokenizer(other, kind="shapes"), shapes.code_offset, shapes.codebook_size)
    assert changed.fingerprint != shapes.fingerprint
    assert set(shapes.meta()) >= {"fingerprint", "code_offset", "codebook_size", "vocab_size"}


def test_from_config(shapes):
    from tasks.config import ModelsConfig

    assert Layout.from_config(ModelsConfig()).fingerprint == shapes.fingerprint
    rel = Layout.from_config(ModelsConfig(tokenizer="qwen-offline", movqgan_preset="270m"))
    assert rel.code_offset == RELEASE_CODE_OFFSET and rel.vocab_size == 171384


def test_the_codebook_size_comes_from_the_movqgan_architecture(tmp_path):
    """A MoVQGAN that is no preset (issue 17): the layout's codebook is its n_embed, from
    models.movqgan, a config beside the weights, or a loaded model; the fingerprint follows."""
    from tasks.config import ModelsConfig

    arch = dict(ch=32, ch_mult=[1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[8], z_channels=4, embed_dim=4,
                n_embed=256)
    tiny = Layout.from_config(ModelsConfig())
    custom = Layout.from_config(ModelsConfig(movqgan=arch))
    assert tiny.codebook_size == 1024 and custom.codebook_size == 256
    assert custom.fingerprint != tiny.fingerprint and custom.vocab_size == tiny.vocab_size - 768
    (tmp_path / "m.json").write_text(json.dumps(arch))
    beside = Layout.from_config(ModelsConfig(movqgan_path=str(tmp_path / "m.ckpt")))
    assert beside.fingerprint == custom.fingerprint
    assert Layout.from_config(ModelsConfig(), codebook_size=256).fingerprint == custom.fingerprint
    with pytest.raises(LayoutError, match="unknown MoVQGAN preset 'huge'"):
        Layout.from_config(ModelsConfig(movqgan_preset="huge"))
