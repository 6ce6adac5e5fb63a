"""The token layout (Uni-Rep): how a prompt and a MoVQGAN code grid become one token sequence.

    python -m model.layout shapes        # print the demo layout and one encoded sample
    python -m model.layout qwen-offline  # the release's layout on the offline Qwen2.5 BPE

A turn (REFERENCE.md, "Sequence layout"):
    [BOS] prompt-text <reserved08706>
    <racm3:break> <h-token> <w-token> (w/8 codes <reserved08799>) x h/8 <eoss> <reserved08706>
Image codes are MoVQGAN indices + code_offset (155000 in the release). The size tokens are
<reserved{8800 + h/32:05d}> and <reserved{8800 + w/32:05d}>; every special token is looked up by
NAME in the tokenizer, never assumed, so the release's own tokenizer folder and the offline one
both work. The demo layout uses the same names on the small shapes tokenizer, with the codes
right after its vocabulary.

The fingerprint hashes everything that gives an id its meaning (the vocabulary, the special ids,
the code offset and codebook size); tokens manifests and checkpoints store it so that datasets and
models made with different layouts are never mixed.
"""
from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

from model.text_tokenizer import TextTokenizer, load_text_tokenizer, size_token_name

IMAGE_START = "<racm3:break>"
IMAGE_END = "<eoss>"
ROW_END = "<reserved08799>"
TURN_END = "<reserved08706>"
RELEASE_CODE_OFFSET = 155000
RELEASE_CODEBOOK = 16384
SIZE_UNIT = 32  # pixels per size-token unit; panel sides are multiples of it


def image_span_length(height_px: int, width_px: int, patch: int = 8) -> int:
    """Tokens of an image span: image start, two size tokens, rows of (cols + row end), image end.
    Prompt validation (tasks/generate/requests.py) counts the context a request needs with it, before any
    model loads; the engine counts the same span."""
    return 4 + (height_px // patch) * (width_px // patch + 1)


def lower_panel_start(loss_start: int, grid_h: int, grid_w: int) -> int:
    """Index of the lower panel's first token in a dual-panel row whose image span begins at
    loss_start: after the image start, the two size tokens and the upper half's rows of grid_w
    codes and a row end (grid_h is the whole span's code rows, both panels)."""
    if grid_h % 2:
        raise ValueError(f"a dual-panel row with {grid_h} code rows: expected an even number (two equal panels)")
    return loss_start + 3 + (grid_h // 2) * (grid_w + 1)


class LayoutError(ValueError):
    """A malformed token sequence, a bad image size, or a tokenizer lacking the layout's tokens."""


class Layout:
    """Token ids of one layout: a text tokenizer plus a codebook placed at code_offset."""

    def __init__(self, tokenizer: TextTokenizer, code_offset: int, codebook_size: int, patch: int = 8,
                 name: str = ""):
        self.tokenizer = tokenizer
        self.code_offset = int(code_offset)
        self.codebook_size = int(codebook_size)
        self.patch = int(patch)  # pixels per code (MoVQGAN downsamples x8)
        self.name = name or tokenizer.kind
        if SIZE_UNIT % self.patch:
            raise LayoutError(f"patch {patch} must divide the size unit {SIZE_UNIT}")

        names = {"bos": tokenizer.bos_token, "image_start": IMAGE_START, "image_end": IMAGE_END,
                 "row_end": ROW_END, "turn_end": TURN_END}
        ids = {k: (tokenizer.token_to_id(v) if v else None) for k, v in names.items()}
        missing = [names[k] or "(a BOS or EOS token)" for k, v in ids.items() if v is None]
        if missing:
            raise LayoutError(
                f"the {tokenizer.kind} tokenizer lacks the layout's special tokens {', '.join(missing)}: use the "
                "release's tokenizer folder, models.tokenizer=qwen-offline, or the shapes tokenizer"
            )
        self.bos, self.image_start, self.image_end = ids["bos"], ids["image_start"], ids["image_end"]
        self.row_end, self.turn_end = ids["row_end"], ids["turn_end"]
        clash = [k for k, v in ids.items() if self.is_code(v)]
        if clash:
            raise LayoutError(f"special tokens {clash} fall inside the code range {self._code_range()}")
        # Size tokens: every n the tokenizer has (n = side / 32), looked up by name.
        self._size_id: dict[int, int] = {}
        for n in range(0, 1024):
            i = tokenizer.token_to_id(size_token_name(n))
            if i is not None:
                self._size_id[n] = i
        self._size_n = {i: n for n, i in self._size_id.items()}
        self.vocab_size = max(len(tokenizer), self.code_offset + self.codebook_size)
        self.fingerprint = self._fingerprint()

    # --- constructors -----------------------------------------------------------------------
    @classmethod
    def release(cls, tokenizer: TextTokenizer | None = None, codebook_size: int = RELEASE_CODEBOOK) -> "Layout":
        """The release's layout: codes at 155000; the offline Qwen2.5 BPE unless a tokenizer is given."""
        tok = tokenizer or load_text_tokenizer("qwen-offline", None)
        return cls(tok, RELEASE_CODE_OFFSET, codebook_size, name="release")

    @classmethod
    def shapes(cls, tokenizer_path: str | None = None, codebook_size: int | None = None) -> "Layout":
        """The demo layout: the shapes tokenizer, codes right after its vocabulary."""
        from model.movqgan import PRESETS

        tok = load_text_tokenizer("shapes", tokenizer_path)
        return cls(tok, len(tok), codebook_size or PRESETS["tiny"]["n_embed"], name="shapes")

    @classmethod
    def from_config(cls, models_cfg, codebook_size: int | None = None) -> "Layout":
        """From a ModelsConfig (tasks/config.py): tokenizer, tokenizer_path, code_offset, and the codebook
        size of the MoVQGAN: `codebook_size` (a loaded model's n_embed), else its architecture
        (models.movqgan, a config beside models.movqgan_path, or models.movqgan_preset; no weights read)."""
        from model.movqgan import MoVQGANError, resolve_architecture

        if codebook_size is None:
            try:
                arch, _ = resolve_architecture(getattr(models_cfg, "movqgan_path", None), models_cfg.movqgan_preset,
                                               getattr(models_cfg, "movqgan", None))
            except MoVQGANError as e:
                raise LayoutError(f"models.movqgan: {e}") from None
            codebook_size = arch["n_embed"]
        tok = load_text_tokenizer(models_cfg.tokenizer, models_cfg.tokenizer_path)
        offset = getattr(models_cfg, "code_offset", None)
        if offset is None:
            offset = len(tok) if models_cfg.tokenizer == "shapes" else RELEASE_CODE_OFFSET
        name = "shapes" if models_cfg.tokenizer == "shapes" else "release"
        return cls(tok, offset, codebook_size, name=name)

    # --- ids --------------------------------------------------------------------------------
    def _code_range(self) -> str:
        return f"{self.code_offset}..{self.code_offset + self.codebook_size - 1}"

    def is_code(self, token_id) -> bool:
        """True for image-code ids (works elementwise on numpy arrays too)."""
        return (token_id >= self.code_offset) & (token_id < self.code_offset + self.codebook_size)

    def size_tokens(self, height_px: int, width_px: int) -> tuple[int, int]:
        """(h-token, w-token) ids of an image of height_px x width_px pixels."""
        out = []
        for what, px in (("height", height_px), ("width", width_px)):
            if px <= 0 or px % SIZE_UNIT:
                raise LayoutError(f"image {what} {px} px: expected a positive multiple of {SIZE_UNIT}")
            n = px // SIZE_UNIT
            if n not in self._size_id:
                raise LayoutError(f"image {what} {px} px: the tokenizer has no size token {size_token_name(n)}")
            out.append(self._size_id[n])
        return out[0], out[1]

    def encode_prompt(self, text: str) -> list[int]:
        """[BOS] + text + turn_end: the user turn."""
        return [self.bos, *self.tokenizer.encode(text), self.turn_end]

    def image_prefix(self, height_px: int, width_px: int) -> list[int]:
        """[image_start, h-token, w-token]: where generation of an image begins."""
        return [self.image_start, *self.size_tokens(height_px, width_px)]

    def grid_tokens(self, grid: np.ndarray) -> np.ndarray:
        """Rows of codes, each closed by row_end (int64 array); also for a partial (upper-panel) grid."""
        g = np.asarray(grid)
        if g.ndim != 2 or g.size == 0:
            raise LayoutError(f"code grid of shape {g.shape}: expected a non-empty [rows, cols] array")
        if not np.issubdtype(g.dtype, np.integer):
            raise LayoutError(f"code grid of dtype {g.dtype}: expected integers")
        if g.min() < 0 or g.max() >= self.codebook_size:
            raise LayoutError(f"code grid holds codes {g.min()}..{g.max()}, outside 0..{self.codebook_size - 1}")
        rows = np.concatenate([g.astype(np.int64) + self.code_offset,
                               np.full((g.shape[0], 1), self.row_end, np.int64)], axis=1)
        return rows.reshape(-1)

    def image_tokens(self, grid: np.ndarray) -> list[int]:
        """The whole image span: prefix, rows with row ends, image_end."""
        g = np.asarray(grid)
        if g.ndim != 2:
            raise LayoutError(f"code grid of shape {g.shape}: expected [rows, cols]")
        prefix = self.image_prefix(g.shape[0] * self.patch, g.shape[1] * self.patch)
        return [*prefix, *self.grid_tokens(g).tolist(), self.image_end]

    def image_length(self, height_px: int, width_px: int) -> int:
        """Tokens of an image span: 3 + rows * (cols + 1) + 1."""
        return image_span_length(height_px, width_px, self.patch)

    def encode_sample(self, prompt: str, grid: np.ndarray) -> tuple[list[int], int]:
        """(ids, loss_start): the user turn then the answer; ids[loss_start:] are supervised (the
        release's labels cover the whole image span and the closing turn_end)."""
        head = self.encode_prompt(prompt)
        return head + self.image_tokens(grid) + [self.turn_end], len(head)

    # --- parsing ----------------------------------------------------------------------------
    def parse_image(self, ids) -> np.ndarray:
        """The code grid [rows, cols] of the first image span in ids; LayoutError if malformed."""
        a = np.asarray(ids, dtype=np.int64).reshape(-1)
        starts = np.flatnonzero(a == self.image_start)
        if starts.size == 0:
            raise LayoutError(f"no image start token ({IMAGE_START}, id {self.image_start}) in {a.size} ids")
        s = int(starts[0])
        if s + 3 > a.size:
            raise LayoutError(f"sequence ends at position {a.size} inside the image prefix started at {s}")
        h_id, w_id = int(a[s + 1]), int(a[s + 2])
        if h_id not in self._size_n or w_id not in self._size_n:
            raise LayoutError(f"positions {s + 1},{s + 2}: ids {h_id},{w_id} are not size tokens (<reserved088xx>)")
        rows = self._size_n[h_id] * SIZE_UNIT // self.patch
        cols = self._size_n[w_id] * SIZE_UNIT // self.patch
        if rows == 0 or cols == 0:
            raise LayoutError(f"position {s + 1}: size tokens name an empty image ({rows}x{cols} codes)")
        body_start, n = s + 3, rows * (cols + 1)
        if body_start + n + 1 > a.size:
            raise LayoutError(f"image of {rows}x{cols} codes at position {s} needs {n + 4} tokens; the sequence "
                              f"has only {a.size - s} from there (truncated)")
        body = a[body_start:body_start + n].reshape(rows, cols + 1)
        bad_end = np.flatnonzero(body[:, -1] != self.row_end)
        if bad_end.size:
            r = int(bad_end[0])
            raise LayoutError(f"row {r} of the image at position {s}: expected the row end ({ROW_END}) at position "
                              f"{body_start + r * (cols + 1) + cols}, got id {int(body[r, -1])}")
        codes = body[:, :-1]
        not_code = np.argwhere(~self.is_code(codes))
        if not_code.size:
            r, c = (int(x) for x in not_code[0])
            raise LayoutError(f"row {r}, column {c} of the image at position {s}: id {int(codes[r, c])} is not an "
                              f"image code ({self._code_range()})")
        end = body_start + n
        if a[end] != self.image_end:
            raise LayoutError(f"position {end}: expected the image end ({IMAGE_END}) after {rows} rows, got id {int(a[end])}")
        return codes - self.code_offset

    # --- identity ---------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        material = {
            "tokenizer": self.tokenizer.digest,
            "specials": [self.bos, self.image_start, self.image_end, self.row_end, self.turn_end],
            "size_tokens": sorted(self._size_id.items()),
            "code_offset": self.code_offset,
            "codebook_size": self.codebook_size,
            "patch": self.patch,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16]

    def meta(self) -> dict:
        """What a tokens manifest or a checkpoint records about its layout."""
        return {"layout": self.name, "fingerprint": self.fingerprint, "tokenizer": self.tokenizer.kind,
                "code_offset": self.code_offset, "codebook_size": self.codebook_size,
                "vocab_size": self.vocab_size, "patch": self.patch}

    def __repr__(self) -> str:
        return (f"Layout({self.name}: bos={self.bos} image_start={self.image_start} image_end={self.image_end} "
                f"row_end={self.row_end} turn_end={self.turn_end} codes={self._code_range()} "
                f"vocab_size={self.vocab_size} fingerprint={self.fingerprint})")


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "shapes"
    layout = Layout.shapes() if kind == "shapes" else Layout.release(load_text_tokenizer(kind, None))
    print(layout)
    ids, start = layout.encode_sample("a red circle", np.arange(16).reshape(4, 4) % layout.codebook_size)
    print(len(ids), start, ids)
