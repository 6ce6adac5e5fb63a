"""Panel composition: decode an input safely, fit it to its bucket, stack the panels, encode.

    python -c "from tasks.panels.compose import decode_image; import sys; print(decode_image(open(sys.argv[1],'rb').read(), sys.argv[1]).shape)" photo.jpg

Every input problem becomes a `Reject` with a short machine-readable reason (the rejects table's
`reason`) and a detail that names the input and says what to do; the build job turns it into a
rejects row, so a bad file never stops a job. Sizes follow model/buckets.py: an image goes to the
bucket of the stage whose aspect ratio is closest, is resized to cover it and centre-cropped
(Lumina-mGPT FP-SFT); a dual panel is one image of width x height whose upper and lower halves are
width x height/2 each (REFERENCE.md, "Sequence layout").
"""
from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from model.buckets import closest_bucket, panel_size

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a reject, not a half-grey picture


class Reject(Exception):
    """An input row that cannot become a panel: reason (machine-readable), detail (for a person)."""

    def __init__(self, reason: str, detail: str, stage: str = "read"):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.stage = reason, detail, stage

    def row(self, input_ref: str) -> dict:
        return {"input_ref": input_ref, "stage": self.stage, "reason": self.reason, "detail": self.detail}


# ---------------------------------------------------------------- reading and decoding


def read_bytes(path: str, ref: str | None = None) -> bytes:
    """The file's bytes, or a Reject saying why they cannot be read."""
    ref = ref or path
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise Reject("unreadable_path", f"{ref}: no such file; fix the path in the captions file or add the file") from None
    except IsADirectoryError:
        raise Reject("unreadable_path", f"{ref}: is a folder, not an image file") from None
    except OSError as e:
        raise Reject("unreadable_path", f"{ref}: cannot be read ({e.strerror or e}); check its permissions") from None
    if not data:
        raise Reject("empty_file", f"{ref}: the file is empty (0 bytes); re-export or remove it")
    return data


def _to_uint8_rgb(im: Image.Image, ref: str) -> np.ndarray:
    """Any PIL mode -> uint8 RGB. Alpha is composited over white (what a viewer shows)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: PIL's convert("L") clips at 255, so scale by the real range instead.
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        g = np.clip(np.round(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        g = np.zeros(a.shape, np.uint8) if hi <= lo else np.round(255 * (a - lo) / (hi - lo)).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "La", "PA"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "RGBa"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
        except (ValueError, OSError) as e:
            raise Reject("unsupported_mode", f"{ref}: image mode {im.mode} cannot be converted to RGB ({e})") from None
    return np.asarray(im, dtype=np.uint8).copy()


def decode_image(data: bytes, ref: str, max_pixels: int = 50_000_000,
                 panel_for: Callable[[int, int], tuple[int, int]] | None = None) -> np.ndarray:
    """Encoded bytes -> uint8 RGB [H, W, 3], upright (EXIF orientation applied). Raises Reject.

    panel_for(width, height) -> the (w, h) panel the upright image will be fitted to (called with
    the full size from the header, before decoding, whatever the format): a JPEG is then decoded at the smallest 1/2, 1/4 or 1/8 DCT scale that still covers it (a 12 MP photo
    for a 512 px panel decodes several times faster, and the result still needs no upscaling).
    """
    if not data:
        raise Reject("empty_file", f"{ref}: the file is empty (0 bytes); re-export or remove it")
    try:
        with warnings.catch_warnings():
            # Our own limit below decides; PIL's warning would only repeat it (its hard error at
            # 2x Image.MAX_IMAGE_PIXELS, ~179 MP, still applies and becomes the same reject).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            # Checked before decoding: the header alone says how much memory the pixels would take.
            if w * h > max_pixels:
                raise Reject("too_many_pixels",
                             f"{ref}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                             "(a decompression bomb, or raise panels.max_pixels)")
            if panel_for is not None:
                turned = im.getexif().get(0x0112) in (5, 6, 7, 8)  # EXIF says: stored sideways
                uw, uh = (h, w) if turned else (w, h)
                pw, ph = panel_for(uw, uh)
                scale = max(pw / uw, ph / uh)
                if scale < 1 and im.format == "JPEG":
                    im.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
            im.load()
            im = ImageOps.exif_transpose(im)  # EXIF-rotated phone photos come out upright
            return _to_uint8_rgb(im, ref)
    except Reject:
        raise
    except UnidentifiedImageError:
        raise Reject("corrupt_image", f"{ref}: not a readable image (unknown or damaged format)") from None
    except Image.DecompressionBombError as e:
        raise Reject("too_many_pixels", f"{ref}: {e}") from None
    except OSError as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg or "broken data stream" in msg else "corrupt_image"
        raise Reject(reason, f"{ref}: the image data is damaged ({msg}); re-export the file") from None
    except (ValueError, SyntaxError, EOFError, MemoryError, TypeError) as e:
        raise Reject("corrupt_image", f"{ref}: cannot decode ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- captions and prompts


def clean_caption(text, ref: str, what: str = "caption") -> str:
    """A usable caption: one line of text, or a Reject (missing_caption / empty_caption)."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        raise Reject(f"missing_{what}", f"{ref}: has no {what}; add one to the captions file", stage="caption")
    if not isinstance(text, str):
        raise Reject(f"missing_{what}", f"{ref}: the {what} is a {type(text).__name__}, not text", stage="caption")
    text = " ".join(text.split())
    if not text:
        raise Reject(f"empty_{what}", f"{ref}: the {what} is empty or only whitespace", stage="caption")
    return text


def check_prompt(prompt: str, max_chars: int, ref: str) -> str:
    if len(prompt) > max_chars:
        raise Reject("prompt_too_long",
                     f"{ref}: the rendered prompt has {len(prompt)} characters, over the budget of {max_chars} "
                     "(panels.max_prompt_chars); shorten the caption", stage="compose")
    return prompt


# ---------------------------------------------------------------- sizes and composition


def bucket_for(width: int, height: int, stage_px: int, dual: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(whole image size, panel size) for an image of width x height at this stage."""
    bucket = closest_bucket(width, height, stage_px, dual=dual)
    return bucket, panel_size(bucket, dual)


def fit(image: np.ndarray, size: tuple[int, int], ref: str, max_upscale: float = 1.0) -> np.ndarray:
    """Resize to cover size=(w, h) keeping the aspect ratio, then centre-crop (FP-SFT)."""
    h, w = image.shape[:2]
    tw, th = size
    scale = max(tw / w, th / h)
    if scale > max_upscale + 1e-9:
        raise Reject("too_small",
                     f"{ref}: {w}x{h} is too small for its {tw}x{th} panel (needs x{scale:.2f} upscaling, "
                     f"limit x{max_upscale:g} in panels.max_upscale)", stage="compose")
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    if (nw, nh) != (w, h):
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        image = cv2.resize(image, (nw, nh), interpolation=interp)
    x0, y0 = (nw - tw) // 2, (nh - th) // 2
    return np.ascontiguousarray(image[y0:y0 + th, x0:x0 + tw])


def stack(upper: np.ndarray, lower: np.ndarray | None) -> np.ndarray:
    """The whole image a dual-panel sample stands for: upper over lower."""
    return upper if lower is None else np.concatenate([upper, lower], axis=0)


def as_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


_CV_EXT = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95, png_level: int = 3) -> bytes:
    """uint8 RGB (or grey) -> encoded bytes. OpenCV's encoders: fast and one thread each."""
    if fmt not in _CV_EXT:
        raise ValueError(f"image format {fmt!r}: expected one of {sorted(_CV_EXT)}")
    img = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = {"png": [cv2.IMWRITE_PNG_COMPRESSION, png_level], "jpeg": [cv2.IMWRITE_JPEG_QUALITY, quality],
              "webp": [cv2.IMWRITE_WEBP_QUALITY, quality]}[fmt]
    ok, buf = cv2.imencode(_CV_EXT[fmt], img, params)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} image as {fmt}")
    return buf.tobytes()


def decode_panel(data: bytes) -> np.ndarray:
    """Encoded panel bytes (as stored in a panels dataset) -> uint8 RGB."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("panel bytes are not a decodable image")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def panel_row(row_id: str, task: str, prompt: str, caption: str, upper: np.ndarray, lower: np.ndarray | None,
              source: str, params: str, fmt: str = "png", png_level: int = 3) -> dict:
    """One row of the PANELS schema; width and height are those of the whole (stacked) image."""
    upper, lower = as_rgb(upper), None if lower is None else as_rgb(lower)
    if lower is not None and lower.shape != upper.shape:
        raise ValueError(f"{row_id}: upper {upper.shape} and lower {lower.shape} panels differ in size")
    h, w = upper.shape[:2]
    return {
        "id": row_id, "task": task, "prompt": prompt, "caption": caption,
        "width": w, "height": h if lower is None else 2 * h,
        "upper": encode_image(upper, fmt, png_level=png_level),
        "lower": None if lower is None else encode_image(lower, fmt, png_level=png_level),
        "source": source, "params": params,
    }
