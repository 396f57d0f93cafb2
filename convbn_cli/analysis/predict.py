"""`convbn predict`: the class of each input image, with its probability, from any model eval accepts.

Inputs are image files (PNG, JPEG), directories of them, or .npy/.npz arrays of pixels. An image is made to
look like the dataset's: grayscale, light strokes on a dark background (MNIST's convention; a dark-on-light
picture is inverted), padded to a square with its background and resized to the model's input size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data import DataError
from ..data.formats import npz_header

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz")
MAX_IMAGE_PIXELS = 64_000_000  # a bigger picture (by its header) is refused before it is decoded
MAX_ARRAY_BYTES = 1 << 30  # likewise for an .npy/.npz array
MAX_INPUTS = 1_000_000


def load_inputs(paths, size: tuple, invert: str = "auto", log=lambda m: None):
    """(names, pixels (N, height, width) float32 in 0-255) for image files, directories of them and arrays.

    Args:
        paths: the INPUT arguments.
        size: (height, width) the model takes.
        invert: "auto" (invert a picture whose border is lighter than its middle: dark strokes on light paper),
            "yes" or "no". Arrays are never inverted: they are taken as the dataset's own pixels.
    """
    names, images = [], []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"{p}: no {'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images in this directory")
            if len(names) + len(files) > MAX_INPUTS:
                raise DataError(f"more than {MAX_INPUTS} inputs; predict on fewer at a time")
            for f in files:
                names.append(str(f))
                images.append(load_image(f, size, invert)[None])
        elif p.suffix.lower() in ARRAY_SUFFIXES:
            x = load_array(p, size, log)
            names += [f"{p}[{i}]" for i in range(len(x))]
            images.append(x)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            names.append(str(p))
            images.append(load_image(p, size, invert)[None])
        else:
            raise DataError(f"{p}: not an image ({', '.join(IMAGE_SUFFIXES)}), array ({', '.join(ARRAY_SUFFIXES)}) "
                            "or directory")
        if len(names) > MAX_INPUTS:
            raise DataError(f"more than {MAX_INPUTS} inputs; predict on fewer at a time")
    return names, np.concatenate(images).astype(np.float32)


def load_image(path: Path, size: tuple, invert: str = "auto") -> np.ndarray:
    """One picture as (height, width) float32 pixels 0-255, light on dark."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise DataError(f"{path}: {img.width}x{img.height} pixels, more than {MAX_IMAGE_PIXELS:,} allowed")
            img = ImageOps.exif_transpose(img)  # phone pictures: the orientation the camera recorded
            if img.mode in ("RGBA", "LA") or "transparency" in img.info:  # transparent: on white, like paper
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
            gray = img.convert("L")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: not a readable image ({' '.join(str(e).split())[:200]})") from None
    a = np.asarray(gray, np.float32)
    if invert == "yes" or (invert == "auto" and _border_is_light(a)):
        a = 255.0 - a
    gray = Image.fromarray(a.astype(np.uint8))
    side = max(gray.size)  # pad to a square with the background (black, after inverting) so nothing stretches
    square = Image.new("L", (side, side), 0)
    square.paste(gray, ((side - gray.width) // 2, (side - gray.height) // 2))
    h, w = size
    return np.asarray(square.resize((w, h), Image.LANCZOS), np.float32)


def _border_is_light(a: np.ndarray) -> bool:
    # MNIST-like images are light strokes on a black background: a border lighter than the middle means paper
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return float(np.median(border)) > 127.0


def load_array(path: Path, size: tuple, log=lambda m: None) -> np.ndarray:
    """Pixels (N, height, width) from an .npy, or from an .npz's x, x_test or only array; shapes (N, H, W),
    (N, H, W, 1) or one image (H, W). Pixels are 0-255; a float array with values in [0, 1] is scaled to that."""
    try:
        if path.suffix.lower() == ".npy":
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
            _check_header(path, "", shape, dtype, size)
            x = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as f:
                key = next((k for k in ("x", "x_test") if k in f.files), f.files[0] if len(f.files) == 1 else None)
                if key is None:
                    raise DataError(f"{path}: which array? name it x (it holds {', '.join(f.files)})")
                shape, dtype = npz_header(f, key)
                _check_header(path, f"[{key}]", shape, dtype, size)
                x = f[key]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(f"{path}: not a readable {path.suffix} array ({' '.join(str(e).split())[:200]})") from None
    floats = np.issubdtype(x.dtype, np.floating)
    x = np.asarray(x, np.float32).reshape((-1, *size))
    if floats and 0 < x.max() <= 1.0:
        log(f"{path}: values in [0, 1]; taken as pixels / 255")
        x = x * 255.0
    return x


def _check_header(path, key, shape, dtype, size) -> None:
    h, w = size
    ok = (tuple(shape) == (h, w) or (len(shape) == 3 and tuple(shape[1:]) == (h, w))
          or (len(shape) == 4 and tuple(shape[1:]) == (h, w, 1)))
    if not ok:
        raise DataError(f"{path}{key}: shape {tuple(shape)}; expected (N, {h}, {w}), (N, {h}, {w}, 1) or ({h}, {w})")
    if dtype.kind not in "uif":
        raise DataError(f"{path}{key}: dtype {dtype}; expected numbers (pixels 0-255)")
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > MAX_ARRAY_BYTES:
        raise DataError(f"{path}{key}: shape {tuple(shape)} ({dtype}) is more than {MAX_ARRAY_BYTES >> 30} GiB")


def predict(target, inputs, *, top_k: int = 1, invert: str = "auto", which: str = "best", scale: float = 1 / 255,
            log=lambda m: None) -> dict:
    """Classify `inputs` (see load_inputs) with TARGET (anything eval accepts, exports and .tflite included).

    Args:
        scale: for a .keras model from outside convbn: what its pixels (0-255) are multiplied by.

    Returns:
        source, class_names, and predictions: one {input, top: [{class, name, probability}, ...]} per input.
    """
    from ..runs.target import open_target

    t = open_target(target, which, tflite=True)
    shape, names, factor, offset = t.pixel_contract(scale)
    if len(shape) != 3 or shape[-1] != 1:
        raise DataError(f"{t.source}: takes inputs of shape {shape}; predict needs grayscale images (H, W, 1)")
    files, pixels = load_inputs(inputs, shape[:2], invert, log)
    logits = np.concatenate([t.predict((pixels[i:i + 500, ..., None] * factor + offset).astype(np.float32))
                             for i in range(0, len(pixels), 500)])
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(top_k, prob.shape[1])
    out = []
    for name, p in zip(files, prob):
        best = np.argsort(-p, kind="stable")[:k]
        out.append({"input": name, "top": [{"class": int(c), "name": names[c], "probability": float(p[c])}
                                           for c in best]})
    return {"source": t.source, "class_names": list(names), "predictions": out}
