"""Decoding the images of a user's dataset into one uint8 array of the target shape (N, H, W, C).

Files are decoded on threads (Pillow releases the GIL in its decoders, and hashlib while it hashes), each image
written straight into a preallocated array once converted and resized: the originals are never kept, so memory
is the target array plus what the threads hold at once, which a budget of decoded bytes bounds.

Before a pixel is decoded, each file's size (MAX_IMAGE_BYTES) and the pixel count its header declares
(MAX_IMAGE_PIXELS) are checked: a 60-byte PNG may declare 40,000 x 40,000 pixels. A file that cannot be used
(empty, truncated, not an image, too large) is a problem (where, why), reported, never silently dropped.

Conversion to the target's channels: grey (C=1) is Pillow's convert("L") (ITU-R 601-2 luma), colour (C=3) its
convert("RGB"); 16-bit greyscale is scaled to 8 bits (Pillow's convert would clip it at 255); transparent
images are composited on white first, as a drawing on paper would look. The phone camera's EXIF orientation is
applied. Then `resize_image`, the one resize rule.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from ...errors import DataError
from ...readers import open_regular, size_text

if TYPE_CHECKING:
    from .listing import ArraySplit

RESIZE_RULES = ("pad", "fit", "stretch")  # pad: keep aspect, scale to fit inside, pad with the border colour
# fit: keep aspect, scale to cover, crop the centre; stretch: scale each side to the target
MAX_IMAGE_BYTES = 64 << 20  # one image file
MAX_IMAGE_PIXELS = 50_000_000  # by its header, before decoding (a 48-megapixel photo fits)
MAX_IMAGE_SIDE = 65_535  # and so is a strip whose one side is absurd (PNG allows 2^31 - 1)
DECODE_BUDGET = 1 << 30  # bytes of decoded pixels the threads may hold at once
BYTES_PER_PIXEL = 16  # what decoding one pixel may hold at once: Pillow's 4-byte pixels, a composite, a copy
# The decoders a dataset's image may be read with (listing.IMAGE_SUFFIXES): Pillow would otherwise try all of its
# ~40, EPS among them, which runs Ghostscript on the file's contents (JPEG includes cameras' MPO files).
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
CHUNK = 64  # images per task: fewer, larger tasks than one per image keep the threads' overhead small
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
SIXTEEN_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


@dataclass
class Header:
    h: int
    w: int
    channels: int  # 1 (L, 1, I;16...) or 3 (RGB, RGBA, P, ...)


@dataclass
class Decoded:
    images: np.ndarray  # uint8 (N, H, W, C): the target shape, only the images that decoded
    labels: np.ndarray  # int64 (N,)
    where: list[str]  # per image
    original: np.ndarray  # int32 (N, 3): height, width, channels before conversion and resize
    hashes: np.ndarray  # 'S16' (N,): blake2b-128 of the original decoded pixels + their shape (exact dups)
    problems: list[tuple[str, str]]  # (where, why) for files that failed to decode (truncated, corrupt)


class _Unusable(Exception):
    """Why one file cannot be used (a problem, not an error: the others are still decoded)."""


# --------------------------------------------------------------------------- headers and decoding

def channels_of(mode: str) -> int:
    return 1 if mode in GREY_MODES else 3


@contextlib.contextmanager
def _opened(path):
    """The Pillow image of the file at `path`, its header read and checked, no pixel decoded yet."""
    from PIL import Image

    with open_regular(path, DataError) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise _Unusable("an empty file (0 bytes)")
        if size > MAX_IMAGE_BYTES:
            raise _Unusable(f"{size_text(size)}, more than an image may be ({size_text(MAX_IMAGE_BYTES)}); refused")
        with Image.open(f, formats=_formats()) as img:  # reads the header only
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS or max(w, h) > MAX_IMAGE_SIDE:
                raise _Unusable(f"{w}x{h} pixels, more than {MAX_IMAGE_PIXELS:,} (or a side over {MAX_IMAGE_SIDE:,}); "
                                "refused before decoding")
            yield img


@functools.cache
def _formats() -> tuple:
    """PILLOW_FORMATS this Pillow has (one built without WebP lacks it; Image.open fails on a name it lacks)."""
    from PIL import Image

    Image.init()
    return tuple(f for f in PILLOW_FORMATS if f in Image.OPEN)


def _why(e: Exception, path) -> str:
    """One line saying why a file failed, without its path (the caller names it) or a file object's repr."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"more pixels than an image may have ({_plain(e)}); refused before decoding"
    if isinstance(e, UnidentifiedImageError):
        return f"not an image of a kind read here ({', '.join(PILLOW_FORMATS)}), or damaged at its start"
    text = _plain(e).replace(f"{path}: ", "")
    return text if isinstance(e, (_Unusable, DataError)) else f"cannot be decoded ({text})"


def _plain(e: Exception) -> str:
    return re.sub(r"\s*<_io\.\w+ name=[^>]*>", "", " ".join(str(e).split()))[:200] or type(e).__name__


def _upright(img):
    """The picture as the camera's EXIF orientation says it is seen (most files have none)."""
    from PIL import ImageOps

    orientation = img.getexif().get(0x0112, 1)
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def _target_pixels(img, channels: int) -> np.ndarray:
    """(h, w, channels) uint8 of a loaded Pillow image: grey by convert("L"), colour by convert("RGB")."""
    from PIL import Image

    if img.mode in SIXTEEN_BIT:  # 16-bit greyscale scaled to 8 bits: Pillow's convert("L") clips at 255
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        grey = ((a * 255 + 32767) // 65535).astype(np.uint8)[:, :, None]
        return grey if channels == 1 else np.repeat(grey, 3, axis=2)
    if img.mode in ("RGBA", "LA", "La", "PA", "RGBa") or "transparency" in img.info:
        # transparent pixels composited on white, as a drawing on paper is seen (and as `convbn predict` does)
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
    mode = "L" if channels == 1 else "RGB"
    a = np.asarray(img if img.mode == mode else img.convert(mode), np.uint8)
    return a.reshape(a.shape[0], a.shape[1], channels)


def pixel_hash(pixels: np.ndarray) -> bytes:
    """blake2b-128 of an image's pixels and its shape: the same picture copied, or saved again losslessly, has the
    same hash; a JPEG of a PNG does not (its pixels differ)."""
    h = hashlib.blake2b(np.ascontiguousarray(pixels).data, digest_size=16)
    h.update(repr(tuple(pixels.shape)).encode())  # the same bytes as 2x8 and as 4x4 are different pictures
    return h.digest()


class _Budget:
    """Bytes of decoded pixels the threads may hold at once: huge pictures decode a few at a time instead of one
    per thread (16 threads x a 50-megapixel picture would be gigabytes). One larger than the whole budget still
    decodes, alone."""

    def __init__(self, total: int):
        self.total = self.free = total
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, n: int):
        n = min(n, self.total)
        with self.cond:
            self.cond.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self.cond:
                self.free += n
                self.cond.notify_all()


def _run(task, n: int, workers: int, progress: bool, desc: str) -> dict:
    """task(i) for i in range(n) on `workers` threads (0: one per CPU), CHUNK images a task, with a tqdm bar (and
    its ETA) on stderr when `progress`; {i: why} for the images that failed. An interrupt (Ctrl-C) cancels what has
    not started and waits only for the chunks under way."""
    from tqdm import tqdm

    def chunk(start):
        failed = {}
        for i in range(start, min(start + CHUNK, n)):
            try:
                task(i)
            except Exception as e:  # noqa: BLE001  Pillow fails on a damaged file in many ways (OSError,
                # SyntaxError, ValueError, struct.error, zlib.error, ...); a signal is not an Exception here
                failed[i] = e.with_traceback(None)  # its frames (and the pixels they hold) are let go
        return start, failed

    failed = {}
    pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    # disable=None: no bar where stderr is not a terminal (a log, a pipe), as the training bar (train/events.py)
    with tqdm(total=n, desc=desc, unit="img", file=sys.stderr, disable=None if progress else True, leave=False) as bar:
        try:
            for future in as_completed([pool.submit(chunk, start) for start in range(0, n, CHUNK)]):
                start, bad = future.result()
                failed.update(bad)
                bar.update(min(CHUNK, n - start))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return failed


def probe(items, workers=2, progress=False) -> tuple[list[Optional[Header]], list[tuple[str, str]]]:
    """Each item's Header, read from its header alone (no pixel decoded); None and a problem (where, why) for a
    file that is unreadable, empty, not an image, or over the byte or pixel limit."""
    headers = [None] * len(items)

    def one(i):
        with _opened(items[i].path) as img:
            headers[i] = Header(img.height, img.width, channels_of(img.mode))

    failed = _run(one, len(items), workers, progress, "reading headers")
    return headers, [(items[i].where, _why(e, items[i].path)) for i, e in sorted(failed.items())]


def decode_items(items, shape: tuple, resize: str, workers: int = 0, progress=True) -> Decoded:
    """The items' images decoded, converted to the target channels and resized to `shape` (H, W, C) by `resize`;
    those that fail are problems. Threads (Pillow releases the GIL while decoding); a bar with an ETA on stderr."""
    height, width, channels = _target(shape, resize)
    n = len(items)
    images = np.empty((n, height, width, channels), np.uint8)
    original = np.zeros((n, 3), np.int32)
    hashes = np.zeros(n, "S16")
    budget = _Budget(DECODE_BUDGET)

    def one(i):
        with _opened(items[i].path) as img, budget.hold(img.width * img.height * BYTES_PER_PIXEL):
            img.load()
            img = _upright(img)
            pixels = _target_pixels(img, channels)
            original[i] = (pixels.shape[0], pixels.shape[1], channels_of(img.mode))
            hashes[i] = pixel_hash(pixels)
            images[i] = resize_image(pixels, shape, resize)

    failed = _run(one, n, workers, progress, "decoding")
    kept = [i for i in range(n) if i not in failed]
    images, original, hashes = _compact((images, original, hashes), kept)
    return Decoded(images, np.array([items[i].label for i in kept], np.int64), [items[i].where for i in kept],
                   original, hashes, [(items[i].where, _why(e, items[i].path)) for i, e in sorted(failed.items())])


def _compact(arrays, kept: list):
    """The rows `kept` of each array, moved down in place (no second copy of the images)."""
    for k, i in enumerate(kept):
        if k != i:
            for a in arrays:
                a[k] = a[i]
    return [a[:len(kept)] for a in arrays]


def _target(shape, resize: str) -> tuple:
    if resize not in RESIZE_RULES:
        raise DataError(f"data.resize: {resize!r} is not one of {', '.join(RESIZE_RULES)}")
    if len(shape) != 3 or shape[2] not in (1, 3) or min(shape[:2]) < 1:
        raise DataError(f"model.input_shape: {list(shape)}; an image shape is [height, width, 1 or 3 channels]")
    return int(shape[0]), int(shape[1]), int(shape[2])


# --------------------------------------------------------------------------- arrays

def check_array_header(where: str, shape, dtype) -> None:
    """Images (N, h, w), (N, h, w, c) with c in 1, 3, 4, or (N, K) with K a square number, of numbers."""
    ok = (len(shape) == 3 or (len(shape) == 4 and shape[-1] in (1, 3, 4))
          or (len(shape) == 2 and shape[1] > 0 and math.isqrt(shape[1]) ** 2 == shape[1]))
    if len(shape) == 4 and shape[-1] not in (1, 3, 4) and shape[1] in (1, 3, 4):
        raise DataError(f"{where}: shape {shape} looks channels-first; expected (N, height, width, channels)")
    if not ok or 0 in shape[1:]:
        raise DataError(f"{where}: shape {shape}; expected images (N, height, width) or (N, height, width, "
                        "channels) with 1, 3 or 4 channels")
    if dtype.kind not in "biuf":
        raise DataError(f"{where}: dtype {dtype}; expected pixels as numbers")


def array_pixels(x: np.ndarray, where: str) -> np.ndarray:
    """uint8 pixels of an array of images: uint8 as they are, other integers and floats in 0-255 rounded, floats
    all in 0-1 scaled by 255, booleans 0 or 255; (N, K) rows of K = side^2 pixels as (N, side, side)."""
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        x = x.reshape(len(x), side, side)
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_:
        return x.astype(np.uint8) * np.uint8(255)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 255:
        raise DataError(f"{where}: pixel values from {lo:g} to {hi:g}; expected 0-255 (or 0-1)")
    scale = 255.0 if x.dtype.kind == "f" and hi <= 1.0 else 1.0
    out = np.empty(x.shape, np.uint8)
    for i in range(0, len(x), 4096):  # in slices: a float64 copy of the whole array would be 8 times its size
        out[i:i + 4096] = np.rint(x[i:i + 4096] * scale) if x.dtype.kind == "f" else x[i:i + 4096]
    return out


def _array_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """(h, w, c) uint8 -> (h, w, channels), as files are converted: RGBA on white, colour to grey by Pillow's
    convert("L"), grey to colour by repeating it."""
    from PIL import Image

    if a.shape[2] == 4:  # composited on white, as a transparent file is
        alpha = a[:, :, 3:].astype(np.uint16)
        a = ((a[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if a.shape[2] == channels:
        return a
    if channels == 3:
        return np.repeat(a, 3, axis=2)
    return np.asarray(Image.fromarray(np.ascontiguousarray(a)).convert("L"))[:, :, None]


def convert_arrays(split: ArraySplit, shape, resize) -> Decoded:
    """Array images (ArraySplit) brought to the target shape by the same conversion and resize rule as files."""
    height, width, channels = _target(shape, resize)
    x = split.images if split.images.ndim == 4 else split.images[:, :, :, None]
    n, h, w, c = x.shape
    images = np.empty((n, height, width, channels), np.uint8)
    hashes = np.zeros(n, "S16")
    for i in range(n):
        pixels = _array_channels(x[i], channels)
        hashes[i] = pixel_hash(pixels)
        images[i] = resize_image(pixels, shape, resize)
    original = np.tile(np.array([h, w, 1 if c == 1 else 3], np.int32), (n, 1))
    where = list(split.rows) if split.rows is not None else [f"{split.where}[{i}]" for i in range(n)]
    return Decoded(images, np.asarray(split.labels, np.int64), where, original, hashes, [])


# --------------------------------------------------------------------------- the resize rule

def border_colour(img: np.ndarray):
    """The pad colour: the median of the border pixels, per channel. A white page pads white, an MNIST digit
    (light strokes on black) pads black, and a few strokes touching the edge do not change it."""
    edge = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    colour = [int(round(v)) for v in np.median(edge, axis=0)]
    return colour[0] if len(colour) == 1 else tuple(colour)


def _filter(from_w, from_h, to_w, to_h):
    from PIL import Image

    # BOX (the mean of the pixels each output pixel covers) when shrinking: no aliasing; BILINEAR when enlarging
    return Image.BOX if to_w <= from_w and to_h <= from_h else Image.BILINEAR


def resize_image(img: np.ndarray, shape, resize) -> np.ndarray:
    """(h, w, c) uint8 -> (H, W, c) uint8 by the rule `resize`: pad (keep the aspect, fit inside, pad with the
    border's colour, centred), fit (keep the aspect, cover, crop the centre) or stretch (each side scaled)."""
    from PIL import Image

    height, width = int(shape[0]), int(shape[1])
    h, w, c = img.shape
    if (h, w) == (height, width):
        return img
    pil = Image.fromarray(np.ascontiguousarray(img[:, :, 0] if c == 1 else img))
    if resize == "stretch":
        out = pil.resize((width, height), _filter(w, h, width, height))
    elif resize == "fit":
        k = max(width / w, height / h)
        bw, bh = width / k, height / k  # the centre part of the source that covers the target
        box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
        out = pil.resize((width, height), _filter(bw, bh, width, height), box=box)
    elif resize == "pad":
        k = min(width / w, height / h)
        nw, nh = min(width, max(1, round(w * k))), min(height, max(1, round(h * k)))
        out = Image.new(pil.mode, (width, height), border_colour(img))
        out.paste(pil.resize((nw, nh), _filter(w, h, nw, nh)), ((width - nw) // 2, (height - nh) // 2))
    else:
        raise DataError(f"data.resize: {resize!r} is not one of {', '.join(RESIZE_RULES)}")
    return np.asarray(out).reshape(height, width, c)
