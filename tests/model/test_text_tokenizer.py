"""Text tokenizers: the offline Qwen2.5 BPE against transformers' Qwen2 tokenizer, the shapes one.

    .venv/bin/python -m pytest -q tests/model/test_text_tokenizer.py
"""
from __future__ import annotations

import json

import pytest

from model.prompts import render_prompt
from model.text_tokenizer import (QWEN_PATTERN, QWEN_SPECIAL_START, HFTokenizer, QwenOfflineTokenizer,
                                  TokenizerError, load_text_tokenizer, qwen_ranks_file)

PROMPTS = [
    render_prompt("t2i", 768, 768, "A photo of an astronaut riding a horse on the moon, 4k, détaillé"),
    render_prompt("control:canny", 512, 1024, "two red circles and a blue square"),
    render_prompt("edit", 512, 512, "a cat on a sofa", instruction="make it a dog  (tabby)\tplease"),
    "Numbers 1234567 and 3.14159, emoji 🙂🚀, CJK 你好世界, Ünïcödé e\u0301, tabs\t\tand\n\nnewlines   ",
    "don't won't I'll we're THEY'VE it's",
]


@pytest.fixture(scope="module")
def offline() -> QwenOfflineTokenizer:
    return load_text_tokenizer("qwen-offline", None)


@pytest.fixture(scope="module")
def hf_qwen2():
    """transformers' Qwen2 tokenizer built from the same ranks by transformers' own converter."""
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    vocab, merges = TikTokenConverter(pattern=PRETOKENIZE_REGEX).extract_vocab_merges_from_model(str(qwen_ranks_file()))
    return Qwen2Tokenizer(vocab=vocab, merges=merges)


def test_same_ids_as_transformers_qwen2(offline, hf_qwen2):
    assert QWEN_PATTERN == __import__("transformers").models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX
    for text in PROMPTS:
        want = hf_qwen2.encode(text, add_special_tokens=False)
        assert offline.encode(text) == want, text
        assert offline.decode(want) == hf_qwen2.decode(want)


def test_qwen_specials_and_added_tokens(offline):
    assert offline.token_to_id("<|endoftext|>") == QWEN_SPECIAL_START
    assert offline.token_to_id("<|file_sep|>") == 151664
    assert offline.token_to_id("<racm3:break>") == 151665 and offline.token_to_id("<eoss>") == 151666
    assert offline.token_to_id("<reserved08799>") == 151670
    assert offline.token_to_id("<reserved99999>") is None
    assert offline.bos_token == "<|endoftext|>" and len(offline) > 151670
    assert offline.token_to_id("Hello") == offline.encode("Hello")[0]


def test_shapes_tokenizer_encodes_any_text():
    tok = load_text_tokenizer("shapes", None)
    for text in PROMPTS:
        assert tok.decode(tok.encode(text)) == text.replace("e\u0301", "\u00e9")  # NFC
    assert len(tok) < 1000 and tok.bos_token == "<bos>"


def test_shapes_tokenizer_asset_is_reproducible(tmp_path):
    from tasks.assets.train_tokenizer import train
    from model.text_tokenizer import SHAPES_TOKENIZER

    out = train(tmp_path / "again.json")
    assert json.loads(out.read_text()) == json.loads(SHAPES_TOKENIZER.read_text())


def test_hf_folder_reads_bos_from_config(tmp_path):
    from tokenizers import Tokenizer

    Tokenizer.from_file(str(load_text_tokenizer("shapes", None).path)).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": {"content": "<eoss>"}}))
    tok = HFTokenizer(tmp_path)
    assert tok.bos_token == "<eoss>" and tok.kind == "hf"


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        HFTokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="tokenizer_path is empty"):
        load_text_tokenizer("hf", None)
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        load_text_tokenizer("sentencepiece", None)
