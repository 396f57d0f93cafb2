"""A small dataset of the user's own in each format of issue 37, trained on for a few steps through the Python API
(load_config, train): a PNG folder with train/ and test/, a JPEG folder as one tree split by data.test_split,
Kaggle's CSV layout with a test.csv without labels, a CSV of path,label rows with class names, an NPZ with
class_names, gzipped IDX pairs, an RGB folder and a folder of mixed sizes, grey and RGB. Each run records the
dataset (data.about: class names, image shape) in its config.yaml and a test accuracy in results.json. Then
`convbn data check` on a folder with planted duplicates (within train, across train/test), a corrupt PNG, a
zero-byte file and a 10:1 imbalance: each named, exit 1; --json parses; --strict refuses."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from own_data import SHAPES, draw, write_folder
from PIL import Image

from conftest import quiet, write_idx
from convbn_cli.cli import main
from convbn_cli.config import load_config
from convbn_cli.train import train

pytestmark = pytest.mark.heavy  # Keras models trained, or (the data check) datasets decoded: slow tier

NAMES = sorted(SHAPES)  # circle, cross, square


def tiny(tmp_path: Path) -> dict:
    """A few steps of a tiny conv-BN net whose last layer has as many units as the dataset has classes."""
    return {
        "data": {"batch_size": 8, "val_split": 0.2},
        "model": {"layers": [{"type": "conv", "filters": 4, "kernel": 3, "stride": 2}, {"type": "global_pool"},
                             {"type": "dense", "units": "classes"}]},
        "train": {"epochs": 1, "seed": 1, "precise_bn": "off"},
        "output": {"root": str(tmp_path / "runs"), "name": "own", "plots": False},
    }


# --------------------------------------------------------------------------- one small dataset per format

def png_train_test(tmp: Path) -> Path:
    return write_folder(tmp / "png", per_class=6)


def jpeg_one_tree(tmp: Path) -> Path:
    return write_folder(tmp / "jpeg", per_class=10, splits=(None,), suffix=".jpg")


def pixels(kind: str, seed: int, side: int = 8) -> np.ndarray:
    return np.asarray(draw(kind, seed, size=(side, side)))


def kaggle_csv(tmp: Path) -> Path:
    root = tmp / "kaggle"
    root.mkdir()
    header = [f"pixel{i}" for i in range(64)]
    rows = [[str(k % 3)] + [str(v) for v in pixels(NAMES[k % 3], k).ravel()] for k in range(36)]
    with open(root / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label"] + header] + rows)
    with open(root / "test.csv", "w", newline="") as f:  # Kaggle's test file: no labels (a predict split)
        csv.writer(f).writerows([header] + [r[1:] for r in rows[:5]])
    return root


def paths_csv(tmp: Path) -> Path:
    root = tmp / "listed"
    (root / "img").mkdir(parents=True)
    rows = [["path", "label"]]
    for k in range(30):
        draw(NAMES[k % 3], k).save(root / "img" / f"{k}.png")
        rows.append([f"img/{k}.png", NAMES[k % 3]])
    with open(root / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root / "labels.csv"


def npz_with_names(tmp: Path) -> Path:
    def split(n, start):
        y = np.arange(n) % 3
        return np.stack([pixels(NAMES[c], start + k, 12) for k, c in enumerate(y)]), y

    (x_train, y_train), (x_test, y_test) = split(30, 0), split(9, 100)
    path = tmp / "shapes.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             class_names=np.array(["ring", "plus", "box"]))  # not sorted: their order is the labels' order
    return path


def idx_gzipped(tmp: Path) -> Path:
    root = tmp / "idx"
    root.mkdir()
    for split, n, start in (("train", 30, 0), ("t10k", 9, 100)):
        y = np.arange(n) % 3
        write_idx(root / f"{split}-images-idx3-ubyte.gz", np.stack([pixels(NAMES[c], start + k, 10)
                                                                   for k, c in enumerate(y)]), compress=True)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", y, compress=True)
    return root


def rgb_folder(tmp: Path) -> Path:
    return write_folder(tmp / "rgb", per_class=6, colour=True)


def mixed_folder(tmp: Path) -> Path:
    """Mostly 20x20 grey pictures, some 16x24 and 32x32, a few in colour: brought to 20x20x3 (pad)."""
    root = tmp / "mixed"
    for k in range(30):
        kind = NAMES[k % 3]
        size = (20, 20) if k % 5 else ((16, 24) if k % 2 else (32, 32))
        (root / kind).mkdir(parents=True, exist_ok=True)
        draw(kind, k, size=size, colour=k % 4 == 0).save(root / kind / f"{k}.png")
    return root


FORMATS = [  # builder, its format, class names, image shape, train + test images
    (png_train_test, "folder", NAMES, [20, 20, 1], 36),
    (jpeg_one_tree, "folder", NAMES, [20, 20, 1], 30),
    (kaggle_csv, "csv", ["0", "1", "2"], [8, 8, 1], 36),
    (paths_csv, "csv", NAMES, [20, 20, 1], 30),
    (npz_with_names, "npz", ["ring", "plus", "box"], [12, 12, 1], 39),
    (idx_gzipped, "idx", ["0", "1", "2"], [10, 10, 1], 39),
    (rgb_folder, "folder", NAMES, [20, 20, 3], 36),
    (mixed_folder, "folder", NAMES, [20, 20, 3], 30),
]


@pytest.mark.parametrize("make, fmt, names, shape, images", FORMATS, ids=[f[0].__name__ for f in FORMATS])
def test_each_format_trains_and_the_run_records_the_dataset(tmp_path, data_dir, make, fmt, names, shape, images):
    path = make(tmp_path)
    cfg = load_config(raw=tiny(tmp_path), overrides=[f"data.dataset={path}"], log=quiet, progress=False)
    about = cfg.data.about
    assert (cfg.own.format, about.class_names, about.image_shape) == (fmt, names, shape)
    assert about.train_size + about.test_size == images and about.test_size > 0
    assert cfg.model.layers[-1].units == len(names) and cfg.model.input_shape == shape
    result = train(cfg, log=quiet, progress=False)
    recorded = yaml.safe_load((result.run_dir / "config.yaml").read_text())["data"]
    assert recorded["dataset"] == {"path": str(Path(path).resolve()), "format": fmt}
    assert recorded["about"]["class_names"] == names and recorded["about"]["image_shape"] == shape
    assert recorded["about"]["content_hash"] == about.content_hash
    results = json.loads((result.run_dir / "results.json").read_text())
    assert 0.0 <= results["test_acc"] <= 1.0 and results["epochs_done"] == 1
    assert results["test_acc"] == pytest.approx(result.test_acc)


def test_the_first_run_on_a_dataset_decodes_it_once(tmp_path, data_dir):
    root = png_train_test(tmp_path)
    lines = []
    cfg = load_config(raw=tiny(tmp_path), overrides=[f"data.dataset={root}"], log=lines.append, progress=False)
    train(cfg, log=lines.append, progress=False)
    decoded = [line for line in lines if line.startswith("[data] decoding")]
    assert len(decoded) == 1, decoded
    assert len(list((data_dir / "own").iterdir())) == 1


# --------------------------------------------------------------------------- data check on planted problems

@pytest.fixture
def planted(tmp_path):
    """train/ + test/ shapes with a copy inside train, a training picture copied into test, a truncated PNG, a
    zero-byte PNG, and 20 circles to 2 squares in train (10:1)."""
    root = tmp_path / "planted"
    n = 0
    for split, counts in (("train", {"circle": 20, "cross": 6, "square": 2}), ("test", dict.fromkeys(NAMES, 3))):
        for kind, k in counts.items():
            (root / split / kind).mkdir(parents=True, exist_ok=True)
            for _ in range(k):
                draw(kind, n).save(root / split / kind / f"{n}.png")
                n += 1
    shutil.copy(root / "train" / "circle" / "0.png", root / "train" / "circle" / "again.png")
    shutil.copy(root / "train" / "cross" / "20.png", root / "test" / "cross" / "leak.png")
    whole = (root / "train" / "circle" / "1.png").read_bytes()
    (root / "train" / "square" / "cut.png").write_bytes(whole[: len(whole) // 2])
    (root / "train" / "cross" / "empty.png").write_bytes(b"")
    Image.open(root / "train" / "circle" / "1.png").verify()  # the original itself is sound
    return root


def copies(out: str, a: str, b: str) -> bool:
    """Whether the report pairs a and b as copies (in either order: the first named is the first in its split's
    order, which is by a hash of the names)."""
    return f"{a} = {b}" in out or f"{b} = {a}" in out


def test_data_check_names_planted_duplicates_corrupt_files_and_imbalance(planted, data_dir):
    runner = CliRunner()
    text = runner.invoke(main, ["data", "check", str(planted), "--no-progress"])
    assert text.exit_code == 1, text.output
    out = text.output
    assert "duplicates_within_split" in out and copies(out, "train/circle/again.png [circle]",
                                                       "train/circle/0.png [circle]")
    assert "duplicates_across_splits" in out and copies(out, "train/cross/20.png [cross]",
                                                        "test/cross/leak.png [cross]")
    assert "unreadable_files: 2 file(s)" in out
    assert "train/cross/empty.png: an empty file (0 bytes)" in out and "train/square/cut.png: cannot be decoded" in out
    assert "class_imbalance" in out and "train: 10.5x, largest 'circle' (21), smallest 'square' (2)" in out
    report = json.loads(runner.invoke(main, ["data", "check", str(planted), "--json", "--no-progress"]).stdout)
    found = json.dumps(report)
    for name in ("duplicates_within_split", "duplicates_across_splits", "unreadable_files", "class_imbalance",
                 "train/circle/again.png", "test/cross/leak.png", "train/cross/empty.png", "train/square/cut.png"):
        assert name in found, name
    strict = runner.invoke(main, ["data", "check", str(planted), "--strict", "--no-progress"])
    assert strict.exit_code == 2, strict.output
    assert "Traceback" not in out + strict.output
