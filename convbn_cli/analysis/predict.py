"""`convbn predict`: the class of each input image, with its probability, from any model eval accepts.

Inputs are image files (PNG, JPEG), directories of them, or .npy/.npz arrays of pixels. An image is made to
look like the dataset's: for MNIST and Fashion-MNIST (and a dataset of the user's own digits) grayscale, light
strokes on a dark background (MNIST's convention; a dark-on-light picture is inverted), padded to a square with its
background and resized to the model's input size; for a dataset of the user's own, decoded as its files were in
training (grey or colour, any suffix it may hold) and brought to the model's input size by the run's data.resize
rule (data/own/decode.py), nothing inverted.
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
from ..data.own.decode import RESIZE_RULES
from ..data.own.listing import IMAGE_SUFFIXES as LISTED_SUFFIXES
from ..data.registry import DIGIT_BOX, MNIST
from ..files import give_usual_mode
from ..readers import array_bytes, array_header, check_zip, open_regular
from .pictures import prepare

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
OWN_SUFFIXES = tuple(sorted(LISTED_SUFFIXES))  # a model of the user's own dataset: any picture its folders may hold
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
                failed=None, stage=None, resize=None, channels: int = 1):
    """(names, pixels float32 in 0-255) for image files, directories of them and arrays: (N, height, width) for
    grayscale (`channels` 1), (N, height, width, 3) for colour.

    Args:
        paths: the INPUT arguments.
        size: (height, width) the model takes.
        invert: "auto" (the ink's polarity measured: dark strokes on light paper are inverted), "yes" or "no".
            Arrays are never inverted: they are taken as the dataset's own pixels. With `resize` auto is no.
        preprocess: "mnist" (pictures are cleaned up, pictures.prepare, then size-normalized and centred as
            MNIST's digits were: mnist_normalize) or "none" (padded to a square and resized). Arrays are taken as
            they are.
        failed: a list: a picture that cannot be read is added to it as {input, error} and the others are still
            read; None: it is an error (DataError). A missing path, a directory without pictures, a file of another
            kind and an array that does not fit are errors either way: they are the call's mistakes, not a picture's.
        stage: stage(index, name, stage name, pixels), called with each stage of each picture (--show).
        resize: a rule of data/own/decode.RESIZE_RULES: with preprocess "none", pictures are decoded and resized
            as the user's own dataset's files were (read_as_dataset); None: as MNIST's (load_image).
        channels: 1 (grayscale) or 3 (colour: a picture made grayscale by preprocess "mnist" is repeated 3 times).
    """
    names, images = [], []
    own = resize is not None and preprocess != "mnist"
    suffixes = OWN_SUFFIXES if own else IMAGE_SUFFIXES

    def picture(f: Path):
        index = len(names)
        try:
            if own:
                images.append(read_as_dataset(f, (*size, channels), resize, invert)[None])
            else:
                a = load_image(f, size, invert, preprocess, stage and (lambda s, x: stage(index, str(f), s, x)))
                images.append((np.repeat(a[..., None], 3, axis=-1) if channels == 3 else a)[None])
            names.append(str(f))
        except DataError as e:
            if failed is None:
                raise
            failed.append({"input": str(f), "error": str(e)})

    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p}: no such file or directory")
        if p.is_dir():
            for f in _pictures_in(p, suffixes, len(names)):
                picture(f)
        elif p.suffix.lower() in ARRAY_SUFFIXES + (".csv",):
            rows, x = _arrays_of(p, (*size, channels), resize, MAX_INPUTS - len(names), log)
            names += rows
            images.append(x)
        elif p.suffix.lower() in suffixes:
            picture(p)
        else:
            raise DataError(f"{p}: not an image ({', '.join(suffixes)}), array ({', '.join(ARRAY_SUFFIXES)}), "
                            "CSV of pixels or directory")
        if len(names) > MAX_INPUTS:
            raise DataError(f"more than {MAX_INPUTS} inputs; predict on fewer at a time")
    if not images:  # every picture failed
        return names, np.zeros((0, *size, *((3,) if channels == 3 else ())), np.float32)
    return names, np.concatenate(images).astype(np.float32)


def _arrays_of(path: Path, shape: tuple, resize, most: int, log) -> tuple:
    """(names, pixels) of an array INPUT: an .npy/.npz (load_array), or a CSV of pixels (load_pixel_csv)."""
    if path.suffix.lower() == ".csv":
        return load_pixel_csv(path, shape, resize or "pad", most)
    x = load_array(path, shape, log)
    return [f"{path}[{i}]" for i in range(len(x))], x


def _pictures_in(folder: Path, suffixes: tuple, before: int) -> list:
    """The pictures of a directory INPUT, sorted; none, or more than MAX_INPUTS with the `before` already read, is
    a DataError."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
    if not files:
        raise DataError(f"{folder}: no {'/'.join(s[1:].upper() for s in suffixes)} images in this directory")
    if before + len(files) > MAX_INPUTS:
        raise DataError(f"more than {MAX_INPUTS} inputs; predict on fewer at a time")
    return files


def load_pixel_csv(path: Path, shape: tuple, resize: str, most: int):
    """(row names, pixels float32 0-255) of a CSV in Kaggle's layout (`label,pixel0,...` or, as its test.csv,
    `pixel0,...`), read by the dataset listing (data/own/listing.py: bounded, one line naming a bad cell), each
    row's square image brought to `shape` by the rule `resize` when its size differs. At most `most` rows."""
    from ..data.own.decode import convert_arrays
    from ..data.own.listing import list_dataset

    listing = list_dataset(path, "csv", max_files=most)
    if not listing.arrays:
        raise DataError(f"{path}: a CSV of image paths; give predict the pictures (or their folder) instead")
    rows, images = [], []
    for split in listing.arrays.values():
        if split.where != Path(path).name:  # a test.csv or val.csv the listing found beside a train.csv: not asked for
            continue
        decoded = convert_arrays(split, tuple(shape), resize)
        rows += list(decoded.where)
        images.append(decoded.images.astype(np.float32))
    x = np.concatenate(images)
    return rows, x[..., 0] if shape[-1] == 1 else x


def read_as_dataset(path: Path, shape: tuple, resize: str, invert: str = "no") -> np.ndarray:
    """One picture as the user's own dataset's files were read in training (data/own/decode.decode_items: its
    decoders, EXIF orientation, transparency on white, grey or colour), brought to `shape` (H, W, C) by the rule
    `resize`; float32 0-255, (H, W) for grey, (H, W, 3) for colour. Inverted only with invert "yes": the dataset's
    pictures are taken as they come (its polarity is whatever the user's files have)."""
    from ..data.own.decode import decode_items
    from ..data.own.listing import Item

    decoded = decode_items([Item(Path(path).absolute(), str(path), "predict", -1, ())], tuple(shape), resize,
                           workers=1, progress=False)
    if decoded.problems:
        raise DataError(f"{path}: {decoded.problems[0][1]}")
    a = decoded.images[0].astype(np.float32)
    a = 255.0 - a if invert == "yes" else a
    return a[..., 0] if shape[-1] == 1 else a


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
        # PNG and JPEG decoders only: Pillow would otherwise try all of its ~40, EPS among them, which runs
        # Ghostscript on the file's contents (data/own/decode.py's PILLOW_FORMATS, for the same reason)
        with open_regular(path, DataError) as f, Image.open(f, formats=("PNG", "JPEG")) as img:
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
    (N, H, W, 1) or one image (H, W). `size` (H, W, 3), a colour model's: (N, H, W, 3) or one image (H, W, 3),
    returned as they are. Pixels are 0-255; a float array with values in [0, 1] is scaled to that."""
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
    x = np.asarray(x, np.float32).reshape((-1, *_image_shape(size)))
    if not np.isfinite(x).all():
        raise DataError(f"{path}: holds pixels that are not finite numbers (NaN or infinity)")
    if floats and 0 < x.max() <= 1.0:
        log(f"{path}: values in [0, 1]; taken as pixels / 255")
        x = x * 255.0
    return x


def _image_shape(size: tuple) -> tuple:
    """One image's array shape: (H, W) for grayscale ((H, W) or (H, W, 1) given), (H, W, 3) for colour."""
    return tuple(size) if len(size) == 3 and size[2] == 3 else tuple(size[:2])


def _check_header(path, key, shape, dtype, size) -> None:
    h, w = size[:2]
    shape = tuple(shape)
    if len(size) == 3 and size[2] == 3:
        ok = shape == (h, w, 3) or (len(shape) == 4 and shape[1:] == (h, w, 3))
        expected = f"(N, {h}, {w}, 3) or ({h}, {w}, 3): this model takes colour images"
    else:
        ok = shape == (h, w) or (len(shape) == 3 and shape[1:] == (h, w)) or (len(shape) == 4
                                                                             and shape[1:] == (h, w, 1))
        expected = f"(N, {h}, {w}), (N, {h}, {w}, 1) or ({h}, {w})"
    if not ok:
        raise DataError(f"{path}{key}: shape {shape}; expected {expected}")
    if dtype.kind not in "uif":
        raise DataError(f"{path}{key}: dtype {dtype}; expected numbers (pixels 0-255)")
    one = len(shape) == len(_image_shape(size))
    if (1 if one else shape[0]) > MAX_INPUTS or array_bytes(shape, dtype) > MAX_ARRAY_BYTES:
        raise DataError(f"{path}{key}: shape {shape} is more than {MAX_INPUTS:,} images; predict on fewer "
                        "at a time (or measure a whole set with `convbn eval`)")


def predict(target, inputs, *, top_k: int = 1, invert: str = "auto", which: str = "best", scale: float = 1 / 255,
            preprocess: str = "auto", show=None, uncertain_below: float = UNCERTAIN_BELOW,
            log=lambda m: None) -> dict:
    """Classify `inputs` (see load_inputs) with TARGET (anything eval accepts, exports and .tflite included).

    Args:
        scale: for a .keras model from outside convbn: what its pixels (0-255) are multiplied by.
        preprocess: "mnist", "none", or "auto": mnist for a model of digits (a run or export on MNIST or on the
            user's own digits, data.about's digits; a model from elsewhere taking 28x28x1 images), none otherwise
            (Fashion-MNIST's pictures were not made so; the user's own: the run's data.resize rule).
        show: a new directory to write each picture's stages (StageWriter) and what the model was fed
            (write_shown) into.
        uncertain_below: a prediction whose top probability is under this is marked uncertain.

    Returns:
        source, class_names, preprocess, resize (the rule pictures were brought to the model's size by, None for
        MNIST's way), uncertain_below, predictions: one {input, uncertain, top: [{class, name, probability}, ...]}
        per input read, failed: one {input, error} per picture that could not be read (the others are predicted
        all the same), and shown: the pictures written, where `show`.
    """
    from ..runs.target import opened

    t = opened(target, which, runnable_only=True)
    shape, names, factor, offset = t.pixel_contract(scale)
    if len(shape) != 3 or shape[-1] not in (1, 3):
        raise DataError(f"{t.source}: takes inputs of shape {shape}; predict reads grayscale (H, W, 1) or colour "
                        "(H, W, 3) images")
    preprocess, resize = preparation(t, tuple(shape), preprocess)
    stages = None
    if show is not None:
        made_empty(Path(show))
        stages = StageWriter(show)
    failed = []
    files, pixels = load_inputs(inputs, shape[:2], invert, log, preprocess, failed=failed, stage=stages,
                                resize=resize, channels=shape[-1])
    shown = stages.written + write_shown(pixels, files, show, fresh=False) if show is not None else None
    x = pixels if shape[-1] == 3 else pixels[..., None]
    factor, offset = np.asarray(factor, np.float32), np.asarray(offset, np.float32)  # per channel: one of each
    logits = [t.predict((x[i:i + 500] * factor + offset).astype(np.float32)) for i in range(0, len(x), 500)]
    flat = pixels.reshape(len(pixels), int(np.prod(pixels.shape[1:])))  # (-1 is ambiguous for no pictures)
    # no ink found (MNIST's way), or a picture of one colour (the user's own): whatever the model says is a guess
    blank = ~flat.any(axis=1) if resize is None else flat.min(axis=1) == flat.max(axis=1)
    out = _ranked(files, np.concatenate(logits) if logits else np.zeros((0, len(names))), names, top_k,
                  uncertain_below, blank)
    result = {"source": t.source, "class_names": list(names), "preprocess": preprocess, "resize": resize,
              "uncertain_below": uncertain_below, "predictions": out, "failed": failed}
    return {**result, "shown": sorted(shown)} if shown is not None else result


def preparation(t, shape: tuple, preprocess: str = "auto") -> tuple:
    """(preprocess, resize) for the opened target `t` taking images of `shape` (H, W, C): preprocess "mnist" for
    digits (under "auto"), else "none"; resize the rule pictures are brought to the model's size by under "none"
    (its run's data.resize for the user's own dataset, what an export away from its run says, "pad" for a colour
    model from elsewhere), or None: MNIST's way (load_image: inverted where light, padded with black)."""
    about = t.about or {}
    if t.config is not None:
        digits, rule = t.config.dataset.digits, t.config.data.resize if t.config.own is not None else None
    else:  # an export away from its run says what it was trained on; a model from elsewhere: by its input shape
        digits = about["digits"] if isinstance(about.get("digits"), bool) else shape == MNIST.image_shape
        rule = about.get("resize") if about.get("resize") in RESIZE_RULES else None
    if preprocess == "auto":
        preprocess = "mnist" if digits else "none"
    if preprocess == "mnist":
        return preprocess, None
    return preprocess, rule or ("pad" if shape[-1] == 3 else None)


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
