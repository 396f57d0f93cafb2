"""`convbn predict`: the class of each input image, with its probability, from any model eval accepts.

Inputs are image files (PNG, JPEG), directories of them, or .npy/.npz arrays of pixels. An image is made to
look like the dataset's: grayscale, light strokes on a dark background (MNIST's convention; a dark-on-light
picture is inverted), padded to a square with its background and resized to the model's input size.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from ..data import DataError
from ..data.external import load_npz_arrays
from ..data.registry import DIGIT_BOX, MNIST
from ..files import give_usual_mode
from ..readers import array_bytes, array_header, check_zip, open_regular
from .pictures import prepare

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ARRAY_SUFFIXES = (".npy", ".npz")
MAX_IMAGE_PIXELS = 25_000_000  # a bigger picture (by its header) is refused before it is decoded (a 12 MP photo fits)
MAX_IMAGE_SIDE = 20_000  # and so is a thin strip whose one side is absurd
MAX_INPUTS = 10_000  # images per call (MNIST's test set); the whole batch is held as float32, ~3 KB an image
MAX_ARRAY_BYTES = 64 << 20  # an .npy/.npz by its header: MAX_INPUTS MNIST-sized images as float64
# A top class under this probability is called uncertain. Measured on 800 pictures of digits (tests/digit_pictures.py,
# seeds 0-3): the small model of tests/test_predict_pictures.py made 4 mistakes, 3 of them under 0.7, and was under
# it on 2% of its right answers; the quick start's model made 1 (at 0.76) and was under it on 2.5% of the rest.
UNCERTAIN_BELOW = 0.7
EXIT_SOME_FAILED = 1  # `convbn predict`: some pictures could not be read (the others were predicted)


def load_inputs(paths, size: tuple, invert: str = "auto", log=lambda m: None, preprocess: str = "none",
                failed=None, stage=None):
    """(names, pixels (N, height, width) float32 in 0-255) for image files, directories of them and arrays.

    Args:
        paths: the INPUT arguments.
        size: (height, width) the model takes.
        invert: "auto" (the ink's polarity measured: dark strokes on light paper are inverted), "yes" or "no".
            Arrays are never inverted: they are taken as the dataset's own pixels.
        preprocess: "mnist" (pictures are cleaned up, pictures.prepare, then size-normalized and centred as
            MNIST's digits were: mnist_normalize) or "none" (padded to a square and resized). Arrays are taken as
            they are.
        failed: a list: a picture that cannot be read is added to it as {input, error} and the others are still
            read; None: it is an error (DataError). A missing path, a directory without pictures, a file of another
            kind and an array that does not fit are errors either way: they are the call's mistakes, not a picture's.
        stage: stage(index, name, stage name, pixels), called with each stage of each picture (--show).
    """
    names, images = [], []

    def picture(f: Path):
        index = len(names)
        try:
            images.append(load_image(f, size, invert, preprocess,
                                     stage and (lambda s, a: stage(index, str(f), s, a)))[None])
            names.append(str(f))
        except DataError as e:
            if failed is None:
                raise
            failed.append({"input": str(f), "error": str(e)})

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
                picture(f)
        elif p.suffix.lower() in ARRAY_SUFFIXES:
            x = load_array(p, size, log)
            names += [f"{p}[{i}]" for i in range(len(x))]
            images.append(x)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            picture(p)
        else:
            raise DataError(f"{p}: not an image ({', '.join(IMAGE_SUFFIXES)}), array ({', '.join(ARRAY_SUFFIXES)}) "
                            "or directory")
        if len(names) > MAX_INPUTS:
            raise DataError(f"more than {MAX_INPUTS} inputs; predict on fewer at a time")
    if not images:  # every picture failed
        return names, np.zeros((0, *size), np.float32)
    return names, np.concatenate(images).astype(np.float32)


def load_image(path: Path, size: tuple, invert: str = "auto", preprocess: str = "none", stage=None) -> np.ndarray:
    """One picture as (height, width) float32 pixels 0-255, light on dark (`preprocess`, `stage`: see load_inputs)."""
    from PIL import Image

    a = read_picture(path)
    if preprocess == "mnist":
        polarity = {"yes": "dark", "no": "light"}.get(invert, "auto")
        out = mnist_normalize(prepare(a, polarity, stage or (lambda s, x: None)), size)
        if stage:
            stage("fed", out)
        return out
    if invert == "yes" or (invert == "auto" and _border_is_light(a)):
        a = 255 - a
    gray = Image.fromarray(a)
    # shrink to the model's size keeping the aspect, then pad to its square with the background (black, after
    # inverting), so nothing stretches; padding the original first would allocate a square of its longest side
    h, w = size
    k = min(w / gray.width, h / gray.height)
    inner = gray.resize((max(1, round(gray.width * k)), max(1, round(gray.height * k))), Image.LANCZOS)
    square = Image.new("L", (w, h), 0)
    square.paste(inner, ((w - inner.width) // 2, (h - inner.height) // 2))
    out = np.asarray(square, np.float32)
    if stage:
        stage("picture", a)
        stage("fed", out)
    return out


def read_picture(path: Path) -> np.ndarray:
    """A PNG or JPEG as (H, W) uint8 gray levels, upright and on white where transparent; a damaged, oversized or
    unknown picture is a DataError naming it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with open_regular(path, DataError) as f, Image.open(f) as img:
            # the header's size, before a pixel is decoded: a 60 KB PNG may declare a billion pixels
            if img.width * img.height > MAX_IMAGE_PIXELS or max(img.size) > MAX_IMAGE_SIDE:
                raise DataError(f"{path}: {img.width}x{img.height} pixels, more than {MAX_IMAGE_PIXELS:,} (or a side "
                                f"over {MAX_IMAGE_SIDE:,}); scale it down first")
            img = ImageOps.exif_transpose(img)  # phone pictures: the orientation the camera recorded
            if img.mode in ("RGBA", "LA") or "transparency" in img.info:  # transparent: on white, like paper
                img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
            return np.asarray(img.convert("L"), np.uint8)
    except DataError:
        raise
    except UnidentifiedImageError:  # its message names the open file object (<_io.BufferedReader name=3>)
        raise DataError(f"{path}: not a readable image (not a PNG or JPEG, or damaged at its start)") from None
    except Exception as e:  # noqa: BLE001  Pillow fails on a damaged picture in many ways (OSError, SyntaxError,
        # ValueError, struct.error, ...: found by fuzzing); a signal is not an Exception here (errors.Stopped)
        raise DataError(f"{path}: not a readable image ({_plain(e)})") from None


def _plain(e: Exception) -> str:
    """An exception's message in one line of at most 200 characters, without the repr of a file object."""
    return re.sub(r"\s*<_io\.\w+ name=[^>]*>", "", " ".join(str(e).split()))[:200] or type(e).__name__


INK = 0.25  # a pixel is ink from a quarter of the picture's brightest stroke up (after inverting)


def mnist_normalize(a: np.ndarray, size: tuple = MNIST.image_shape[:2]) -> np.ndarray:
    """A light-on-dark picture made the way MNIST's digits were (LeCun et al.): cropped to the ink's bounding box,
    resized with antialiasing to fit a box of 20/28 of the image keeping its aspect ratio, and placed so that its
    centre of mass is the image's centre. A digit drawn small in the corner of a large canvas then looks to the
    model like the digits it was trained on. A picture without ink is returned blank."""
    from PIL import Image

    h, w = size
    out = np.zeros((h, w), np.float32)
    a = np.asarray(a, np.float32)
    if a.max() <= 0:
        return out
    rows, cols = np.nonzero(a >= INK * a.max())
    crop = a[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    box_h, box_w = round(h * DIGIT_BOX / MNIST.height), round(w * DIGIT_BOX / MNIST.width)
    k = min(box_h / crop.shape[0], box_w / crop.shape[1])
    new_w, new_h = max(1, round(crop.shape[1] * k)), max(1, round(crop.shape[0] * k))
    digit = np.asarray(Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize((new_w, new_h), Image.LANCZOS),
                       np.float32)
    mass = digit.sum()
    cy = (digit.sum(axis=1) * np.arange(new_h)).sum() / mass if mass else (new_h - 1) / 2
    cx = (digit.sum(axis=0) * np.arange(new_w)).sum() / mass if mass else (new_w - 1) / 2
    top = int(round((h - 1) / 2 - cy))
    left = int(round((w - 1) / 2 - cx))
    top, left = min(max(top, 0), h - new_h), min(max(left, 0), w - new_w)  # the whole digit stays in the picture
    out[top:top + new_h, left:left + new_w] = digit
    return out


def write_shown(images: np.ndarray, names: list, folder, zoom: int = 8, fresh: bool = True) -> list:
    """--show DIR: what the model was fed, one PNG per input (enlarged `zoom` times, nearest neighbour, so that
    the pixels stay visible), into a new or empty DIR (`fresh`; False: DIR was made so by the caller, who wrote the
    stages there: StageWriter); never over a file, even one that appears in DIR while the pictures are written
    (made_empty, write_new)."""
    from PIL import Image

    folder = Path(folder)
    if fresh:
        made_empty(folder)
    written = []
    for i, (x, name) in enumerate(zip(images, names)):
        out = folder / f"{i:04d}-{_stem(name)}.png"
        img = Image.fromarray(np.asarray(x, np.float32).clip(0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.resize((img.width * zoom, img.height * zoom), Image.NEAREST).save(buf, format="PNG")
        write_new(out, buf.getvalue())
        written.append(str(out))
    return written


def _stem(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name.split("[")[0]).stem)[:60]


STAGES = ("picture", "background", "normalized", "denoised", "strokes")  # pictures.prepare's, in order


class StageWriter:
    """--show DIR for pictures: each stage of each picture before what the model was fed, as
    NNNN-NAME.K-STAGE.png beside write_shown's NNNN-NAME.png (K: the stage's place in STAGES, from 1); a small
    stage is enlarged (nearest neighbour) to at least 200 pixels on its longer side. Written as the pictures are
    read, so that the stages of 10,000 pictures are never held at once."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.written = []

    def __call__(self, index: int, name: str, stage: str, pixels) -> None:
        from PIL import Image

        if stage not in STAGES:  # "fed": write_shown's picture, of the batch the model was given
            return
        img = Image.fromarray(np.asarray(pixels, np.float32).clip(0, 255).astype(np.uint8))
        k = max(1, -(-200 // max(img.size)))
        buf = io.BytesIO()
        img.resize((img.width * k, img.height * k), Image.NEAREST).save(buf, format="PNG")
        out = self.folder / f"{index:04d}-{_stem(name)}.{STAGES.index(stage) + 1}-{stage}.png"
        write_new(out, buf.getvalue())
        self.written.append(str(out))


def made_empty(folder: Path) -> None:
    """Make `folder` (os.mkdir: it fails where anything, a dangling link included, took the name meanwhile) or
    accept an empty directory there; anything else is refused."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(folder)
    except FileExistsError:
        if not folder.is_dir() or any(folder.iterdir()):
            raise DataError(f"--show {folder}: exists and is not an empty directory; name a new one") from None


def write_new(path: Path, data: bytes) -> None:
    """Write `path`, which must not exist (checked by the kernel at the moment of the write, not before it): the
    bytes go to a temporary beside it, which is hard-linked to its name (os.link, unlike os.replace, fails where
    the name exists) and then removed, so a kill leaves no half-written picture under the name either. Where the
    file system has no hard links, the name is opened with O_EXCL instead."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        give_usual_mode(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise DataError(f"--show {path}: appeared while the pictures were written; left as it is") from None
        except OSError:  # no hard links here (a FAT or some network file systems)
            _write_exclusive(path, data)
    finally:
        os.unlink(tmp)


def _write_exclusive(path: Path, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except FileExistsError:
        raise DataError(f"--show {path}: appeared while the pictures were written; left as it is") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _border_is_light(a: np.ndarray) -> bool:
    # MNIST-like images are light strokes on a black background: a border lighter than the middle means paper
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return float(np.median(border)) > 127.0


def load_array(path: Path, size: tuple, log=lambda m: None) -> np.ndarray:
    """Pixels (N, height, width) from an .npy, or from an .npz's x, x_test or only array; shapes (N, H, W),
    (N, H, W, 1) or one image (H, W). Pixels are 0-255; a float array with values in [0, 1] is scaled to that."""
    if path.suffix.lower() == ".npy":
        try:
            with open_regular(path, DataError) as f:
                shape, dtype = array_header(f, path, DataError)
                _check_header(path, "", shape, dtype, size)
                f.seek(0)
                x = np.lib.format.read_array(f, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{path}: not a readable .npy array ({' '.join(str(e).split())[:200]})") from None
    else:
        members = {m.filename[:-4] for m in check_zip(path, {}, MAX_ARRAY_BYTES, max_members=64,
                                                       what="an .npz of arrays", error=DataError)}
        key = next((k for k in ("x", "x_test") if k in members), next(iter(members)) if len(members) == 1 else None)
        if key is None:
            raise DataError(f"{path}: which array? name it x (it holds {', '.join(sorted(members)) or 'nothing'})")
        x = load_npz_arrays(path, (key,), MAX_ARRAY_BYTES, "",
                            check=lambda k, shape, dtype: _check_header(path, f"[{k}]", shape, dtype, size))[0]
    if x.size == 0:
        raise DataError(f"{path}: holds no images (shape {x.shape})")
    floats = np.issubdtype(x.dtype, np.floating)
    x = np.asarray(x, np.float32).reshape((-1, *size))
    if not np.isfinite(x).all():
        raise DataError(f"{path}: holds pixels that are not finite numbers (NaN or infinity)")
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
    if (shape[0] if len(shape) > 2 else 1) > MAX_INPUTS or array_bytes(shape, dtype) > MAX_ARRAY_BYTES:
        raise DataError(f"{path}{key}: shape {tuple(shape)} is more than {MAX_INPUTS:,} images; predict on fewer "
                        "at a time (or measure a whole set with `convbn eval`)")


def predict(target, inputs, *, top_k: int = 1, invert: str = "auto", which: str = "best", scale: float = 1 / 255,
            preprocess: str = "auto", show=None, uncertain_below: float = UNCERTAIN_BELOW,
            log=lambda m: None) -> dict:
    """Classify `inputs` (see load_inputs) with TARGET (anything eval accepts, exports and .tflite included).

    Args:
        scale: for a .keras model from outside convbn: what its pixels (0-255) are multiplied by.
        preprocess: "mnist", "none", or "auto": mnist for a model of MNIST digits (a run or export on mnist, or a
            model from elsewhere taking 28x28x1 images), none otherwise (Fashion-MNIST's pictures were not made so).
        show: a new directory to write each picture's stages (StageWriter) and what the model was fed
            (write_shown) into.
        uncertain_below: a prediction whose top probability is under this is marked uncertain.

    Returns:
        source, class_names, preprocess, uncertain_below, predictions: one {input, uncertain, top: [{class, name,
        probability}, ...]} per input read, failed: one {input, error} per picture that could not be read (the
        others are predicted all the same), and shown: the pictures written, where `show`.
    """
    from ..runs.target import opened

    t = opened(target, which, runnable_only=True)
    shape, names, factor, offset = t.pixel_contract(scale)
    if len(shape) != 3 or shape[-1] != 1:
        raise DataError(f"{t.source}: takes inputs of shape {shape}; predict needs grayscale images (H, W, 1)")
    if preprocess == "auto":
        digits = t.config.data.dataset == MNIST.name if t.config is not None else tuple(shape) == MNIST.image_shape
        preprocess = "mnist" if digits else "none"
    stages = None
    if show is not None:
        made_empty(Path(show))
        stages = StageWriter(show)
    failed = []
    files, pixels = load_inputs(inputs, shape[:2], invert, log, preprocess, failed=failed, stage=stages)
    shown = stages.written + write_shown(pixels, files, show, fresh=False) if show is not None else None
    logits = [t.predict((pixels[i:i + 500, ..., None] * factor + offset).astype(np.float32))
              for i in range(0, len(pixels), 500)]
    blank = ~pixels.any(axis=(1, 2))  # no ink found: whatever the model says is a guess
    out = _ranked(files, np.concatenate(logits) if logits else np.zeros((0, len(names))), names, top_k,
                  uncertain_below, blank)
    result = {"source": t.source, "class_names": list(names), "preprocess": preprocess,
              "uncertain_below": uncertain_below, "predictions": out, "failed": failed}
    return {**result, "shown": sorted(shown)} if shown is not None else result


def _ranked(files, logits, names, top_k, uncertain_below, blank) -> list:
    z = logits - logits.max(axis=1, keepdims=True) if len(logits) else logits
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    k = min(top_k, len(names))
    out = []
    for name, p, empty in zip(files, prob, blank):
        best = np.argsort(-p, kind="stable")[:k]
        out.append({"input": name, "uncertain": bool(p[best[0]] < uncertain_below or empty),
                    "top": [{"class": int(c), "name": names[c], "probability": float(p[c])} for c in best]})
    return out
