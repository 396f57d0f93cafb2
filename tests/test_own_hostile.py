"""The bad inputs of issue 37 as a user meets them: `convbn data check BAD` and `convbn train folder_cnn
data.dataset=BAD`, each in a child process of its own. Every one ends with exactly one line on stderr naming the
file (and the line, for a CSV), exit 2, no traceback, under 1 GiB of memory (the child's own peak, its VmHWM),
without waiting on a FIFO, and with nothing written inside the dataset's folder. One bad picture among good ones
is skipped and counted instead: `data check` names it and warns (exit 1), `--strict` refuses (exit 2), and
`train` still trains."""

from __future__ import annotations

import csv
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from own_data import write_folder

pytestmark = pytest.mark.process  # every test here starts convbn in a child process

GIB = 1 << 30
TIMEOUT = 120  # seconds: a child that waits on a FIFO is killed and the test fails, rather than hanging the suite


@dataclass
class Ran:
    rc: int
    out: str
    err: str
    peak_rss: int  # bytes: the child's own peak resident set size


# The child's own peak resident set (VmHWM: the high-water mark of the memory of the program it runs), read while
# it runs and written by it as its last act where it exits through atexit. Not wait4's ru_maxrss: Linux carries
# the parent's high-water mark across fork and exec into it, so a child of a pytest session grown to 2 GB
# reported 2 GB whatever it did (seen in CI).
PEAK_WRAPPER = r"""
import atexit, os, runpy, sys
def peak():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(os.environ["CONVBN_TEST_PEAK_FILE"], "w") as f:
        f.write(str(kb * 1024))
atexit.register(peak)
sys.argv[0] = "convbn"
runpy.run_module("convbn_cli", run_name="__main__", alter_sys=True)
"""


def convbn(*args, env: dict, timeout: float = TIMEOUT) -> Ran:
    """`python -m convbn_cli ARGS` in a child process that writes its own peak RSS as it exits (PEAK_WRAPPER).
    Output goes to files, so a chatty child never blocks on a full pipe; stdin is /dev/null, so nothing waits for
    a person either."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".peak") as peak:
        child = subprocess.Popen([sys.executable, "-c", PEAK_WRAPPER, *map(str, args)], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=err,
                                 env={**os.environ, **env, "CONVBN_TEST_PEAK_FILE": peak.name})
        deadline, seen = time.monotonic() + timeout, 0
        while True:
            seen = max(seen, _high_water(child.pid))  # as it runs: a training ends in os._exit, past atexit
            pid, status, _ = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
                os.wait4(child.pid, 0)
                child.returncode = -9
                pytest.fail(f"convbn {' '.join(map(str, args))} still ran after {timeout} s (waiting on a FIFO?)")
            time.sleep(0.05)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        out.seek(0)
        err.seek(0)
        written = Path(peak.name).read_text()
        assert written or seen, f"convbn {' '.join(map(str, args))}: no measure of its peak memory"
        return Ran(child.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                   max(int(written or 0), seen))


def _high_water(pid: int) -> int:
    """A running process's VmHWM in bytes (its peak resident set so far), 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def tree(root: Path) -> dict:
    """Every entry below root (links and FIFOs by their own lstat, never followed or opened): path -> (kind,
    size, mtime)."""
    out = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            out[os.path.relpath(os.path.join(folder, name), root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------- the bad inputs

def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(path: Path, side: int = 40_000) -> Path:
    """A valid PNG whose IHDR declares side x side 8-bit grey pixels (1.6 G pixels for 40,000) over a few bytes
    of data: decoding it would ask for 1.6 GB before noticing the data is short."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def kaggle_rows(n: int, side: int = 2) -> list:
    header = ["label"] + [f"pixel{i}" for i in range(side * side)]
    return [header] + [[str(k % 3)] + [str((k * 7 + i) % 256) for i in range(side * side)] for k in range(n)]


def write_idx(path: Path, array: np.ndarray, count=None) -> Path:
    """A gzipped IDX file; `count`, if given, is the number of items the header declares instead of the true one."""
    dims = ((len(array) if count is None else count),) + array.shape[1:]
    head = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in dims)
    path.write_bytes(gzip.compress(head + array.astype(np.uint8).tobytes()))
    return path


def empty_class_folder(tmp: Path):
    root = write_folder(tmp / "shapes", per_class=2)
    (root / "train" / "void").mkdir()
    return root, root, [str(root / "train" / "void"), "empty class folder"]


def text_files(tmp: Path):
    root = tmp / "notes"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            (root / cls / f"{i}.txt").write_text("not a picture\n")
    return root, root, [f"no images under {root}", "cat/0.txt"]


def huge_png_alone(tmp: Path):
    root = tmp / "huge"
    huge_png(root / "big" / "a.png")
    huge_png(root / "small" / "b.png")
    return root, root, [str(root), "big/a.png", "refused before decoding"]


def kaggle_missing_pixel_column(tmp: Path):
    rows = kaggle_rows(3)
    for row in rows:
        del row[3]  # pixel2
    path = write_csv(tmp / "digits" / "train.csv", rows)
    return path.parent, path, [str(path), "line 1", "no column 'pixel2'"]


def paths_csv_missing_label_column(tmp: Path):
    root = write_folder(tmp / "pics", per_class=1, splits=(None,))
    path = write_csv(root / "labels.csv", [["path"], ["circle/0.png"], ["square/1.png"]])
    return root, path, [str(path), "line 1", "no 'label' column"]


def csv_row_missing_a_cell(tmp: Path):
    rows = kaggle_rows(4)
    rows[3] = rows[3][:-1]
    path = write_csv(tmp / "digits" / "train.csv", rows)
    return path.parent, path, [str(path), "line 4", "4 cells, the header has 5"]


def kaggle_label_seven(tmp: Path):
    rows = kaggle_rows(4)
    rows[2][0] = "seven"
    path = write_csv(tmp / "digits" / "train.csv", rows)
    return path.parent, path, [str(path), "line 3", "label 'seven'"]


def paths_csv_label_seven(tmp: Path):
    root = write_folder(tmp / "pics", per_class=1, splits=(None,))
    path = write_csv(root / "labels.csv", [["path", "label"], ["circle/0.png", "0"], ["square/1.png", "seven"],
                                           ["cross/2.png", "2"]])
    return root, path, [str(path), "line 3", "label 'seven'"]


def idx_header_lies(tmp: Path):
    root = tmp / "idx"
    root.mkdir()
    images = write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((3, 4, 4)), count=60_000)
    write_idx(root / "train-labels-idx1-ubyte.gz", np.array([0, 1, 2]))
    return root, root, [str(images), "60000"]


def link_to_etc_in_a_class_folder(tmp: Path):
    root = write_folder(tmp / "shapes", per_class=1, splits=(None,))
    os.symlink("/etc", root / "circle" / "etc")
    return root, root, [str(root / "circle" / "etc"), "/etc", "outside"]


def link_to_etc_as_a_class_folder(tmp: Path):
    root = write_folder(tmp / "shapes", per_class=1, splits=(None,))
    os.symlink("/etc", root / "etc")
    return root, root, [str(root / "etc"), "/etc", "outside"]


def fifo_in_a_class_folder(tmp: Path):
    root = write_folder(tmp / "shapes", per_class=1, splits=(None,))
    os.mkfifo(root / "circle" / "late.png")  # opened for reading, it would wait for a writer forever
    return root, root, [str(root / "circle" / "late.png"), "FIFO"]


def fifo_as_the_dataset(tmp: Path):
    os.mkfifo(tmp / "train.csv")
    return tmp, tmp / "train.csv", [str(tmp / "train.csv"), "FIFO"]


BAD = [empty_class_folder, text_files, huge_png_alone, kaggle_missing_pixel_column, paths_csv_missing_label_column,
       csv_row_missing_a_cell, kaggle_label_seven, paths_csv_label_seven, idx_header_lies,
       link_to_etc_in_a_class_folder, link_to_etc_as_a_class_folder, fifo_in_a_class_folder, fifo_as_the_dataset]


def commands(kind: str, dataset: Path, tmp: Path, progress: bool = False) -> list:
    quiet = [] if progress else ["--no-progress"]
    if kind == "check":
        return ["data", "check", dataset, *quiet]
    return ["train", "folder_cnn", f"data.dataset={dataset}", f"output.root={tmp / 'runs'}", "train.epochs=1", *quiet]


@pytest.mark.parametrize("kind", ["check", "train"])
@pytest.mark.parametrize("make", BAD, ids=[f.__name__ for f in BAD])
def test_each_bad_input_is_one_line_naming_the_file_exit_2_under_a_gib(tmp_path, make, kind):
    data = tmp_path / "data"
    data.mkdir()
    folder, dataset, named = make(data)
    before = tree(folder)
    ran = convbn(*commands(kind, dataset, tmp_path), env={"CONVBN_DATA_DIR": str(tmp_path / "cache")})
    lines = ran.err.splitlines()
    assert ran.rc == 2, (ran.rc, ran.err, ran.out[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), ran.err
    for text in named:
        assert text in lines[0], (text, lines[0])
    assert "Traceback" not in ran.err + ran.out and ran.out == ""
    assert ran.peak_rss < GIB, f"{ran.peak_rss / 2**20:.0f} MiB"
    assert tree(folder) == before  # nothing written inside the user's dataset
    assert not (tmp_path / "runs").exists()  # a refused dataset starts no run


@pytest.mark.parametrize("kind", ["check", "train"])
def test_a_bad_input_read_past_the_listing_is_still_one_line_in_a_log(tmp_path, kind):
    """As a user meets it without --no-progress, with stderr going to a file: the 40,000 x 40,000 PNGs get past
    the listing to the header probe, whose bar must not be drawn there."""
    folder, dataset, named = huge_png_alone(tmp_path)
    ran = convbn(*commands(kind, dataset, tmp_path, progress=True), env={"CONVBN_DATA_DIR": str(tmp_path / "cache")})
    assert ran.rc == 2 and named[1] in ran.err
    assert ran.err.splitlines() == [ran.err.strip()] and ran.err.startswith("error: "), repr(ran.err[:300])


# --------------------------------------------------------------------------- one bad picture among good ones

@pytest.fixture
def one_bad(tmp_path):
    """(dataset, what its tree was) of a tiny train/test folder of 20x20 shapes with one 40,000 x 40,000 PNG in
    it: skipped and counted by default, refused under --strict."""
    root = write_folder(tmp_path / "shapes", per_class=4)
    huge_png(root / "train" / "square" / "huge.png")
    return root, tree(root)


def test_one_bad_picture_is_named_by_data_check_as_a_warning_and_refused_under_strict(tmp_path, one_bad):
    root, before = one_bad
    env = {"CONVBN_DATA_DIR": str(tmp_path / "cache")}
    warned = convbn("data", "check", root, "--no-progress", env=env)
    assert warned.rc == 1, (warned.err, warned.out)
    assert "train/square/huge.png" in warned.out and "refused before decoding" in warned.out, warned.out
    assert "Traceback" not in warned.err + warned.out and warned.peak_rss < GIB
    as_json = json.loads(convbn("data", "check", root, "--json", "--no-progress", env=env).out)
    assert "train/square/huge.png" in json.dumps(as_json)
    strict = convbn("data", "check", root, "--strict", "--no-progress", env=env)
    assert strict.rc == 2 and "train/square/huge.png" in strict.out + strict.err, (strict.err, strict.out)
    assert "Traceback" not in strict.err + strict.out and strict.peak_rss < GIB
    assert tree(root) == before


def test_train_skips_one_bad_picture_and_trains(tmp_path, one_bad):
    root, before = one_bad
    runs = tmp_path / "runs"
    ran = convbn("train", "folder_cnn", f"data.dataset={root}", f"output.root={runs}", "train.epochs=1",
                 "output.plots=false", "--no-progress", env={"CONVBN_DATA_DIR": str(tmp_path / "cache")}, timeout=400)
    assert ran.rc == 0, ran.err[-3000:]
    assert "unreadable_files: 1 file(s) could not be used and were skipped" in ran.err  # counted, and said so
    results = json.loads((runs / "folder_cnn" / "1" / "results.json").read_text())
    assert results["epochs_done"] == 1 and 0 <= results["test_acc"] <= 1
    assert "Traceback" not in ran.err and ran.peak_rss < GIB, f"{ran.peak_rss / 2**20:.0f} MiB"
    assert tree(root) == before
