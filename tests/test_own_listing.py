"""Listing a user's own dataset (data/own/listing.py): each layout (image folders, both CSV layouts, NPZ, IDX),
and each bad input refused with one line naming the file (and the CSV line): an empty class folder, a folder of
text files, a missing CSV column, a label "seven", an IDX header that lies about its count, a symbolic link out of
the dataset, a FIFO, more images than data.max_files."""

from __future__ import annotations

import csv
import gzip
import os
import struct

import numpy as np
import pytest
from PIL import Image

from convbn_cli.data.own.listing import SPLITS, list_dataset
from convbn_cli.errors import DataError

TRAIN = "train"  # a name, not `["train"`, which tests/conftest.py reads as a test that trains


def picture(path, size=(5, 4), mode="L", value=0, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, format=fmt)
    return path


def refused(fn, *names) -> str:
    """fn's DataError message: one line, naming each of `names`."""
    with pytest.raises(DataError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    for name in names:
        assert str(name) in msg, msg
    return msg


# --------------------------------------------------------------------------- image folders

def test_a_folder_of_class_folders_is_one_pool_with_sorted_class_names(tmp_path):
    root = tmp_path / "pets"
    picture(root / "dog" / "b.png", mode="RGB")
    picture(root / "cat" / "a.png")
    picture(root / "cat" / "deeper" / "c.jpg", fmt="JPEG")
    picture(root / "dog" / "d.BMP", fmt="BMP")
    (root / "dog" / "notes.txt").write_text("not a picture")
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden: never looked at
    (root / "dog" / "._b.png").write_bytes(b"AppleDouble")
    (root / "README.md").write_text("about")
    got = list_dataset(root)
    assert got.format == "folder" and got.class_names == ["cat", "dog"] and got.arrays == {}
    assert [(i.where, i.split, i.label) for i in got.items] == [
        ("cat/a.png", "pool", 0), ("cat/deeper/c.jpg", "pool", 0), ("dog/b.png", "pool", 1), ("dog/d.BMP", "pool", 1)]
    assert all(i.path.is_absolute() and i.stat_key[0] == i.path.stat().st_size for i in got.items)
    assert sorted(got.skipped) == [("README.md", "not in a class folder"), ("dog/notes.txt", "not an image (.txt)")]
    assert got.files == sorted(i.path for i in got.items) and got.root == root.resolve()


def test_train_test_and_val_folders_are_splits_with_the_union_of_their_classes(tmp_path):
    picture(tmp_path / "train" / "a" / "1.png")
    picture(tmp_path / "train" / "b" / "2.png")
    picture(tmp_path / "test" / "c" / "3.png")
    picture(tmp_path / "val" / "b" / "4.png")
    got = list_dataset(tmp_path, "folder")
    assert got.class_names == ["a", "b", "c"]
    assert [(i.split, i.label) for i in got.items] == [("train", 0), ("train", 1), ("val", 1), ("test", 2)]
    assert all(i.split in SPLITS for i in got.items)
    (tmp_path / "test" / "c" / "3.png").unlink()
    (tmp_path / "test" / "c").rmdir()
    (tmp_path / "test").rmdir()
    assert {i.split for i in list_dataset(tmp_path).items} == {"pool", "val"}  # no test: the pool is split later


def test_a_link_inside_the_dataset_is_followed_and_a_broken_one_reported(tmp_path):
    real = picture(tmp_path / "a" / "1.png")
    (tmp_path / "b").mkdir()
    os.symlink(real, tmp_path / "b" / "same.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "a" / "broken.png")
    got = list_dataset(tmp_path)
    assert [(i.where, i.path) for i in got.items] == [("a/1.png", real), ("b/same.png", real)]
    assert ("a/broken.png", "a broken symbolic link") in got.skipped


def test_bad_folders_are_one_line_naming_what_is_wrong(tmp_path):
    picture(tmp_path / "ok" / "cat" / "1.png")
    (tmp_path / "ok" / "dog").mkdir()
    refused(lambda: list_dataset(tmp_path / "ok"), tmp_path / "ok" / "dog", "empty class folder")
    for i in range(3):
        (tmp_path / "texts" / "cat").mkdir(parents=True, exist_ok=True)
        (tmp_path / "texts" / "cat" / f"{i}.txt").write_text("words")
    refused(lambda: list_dataset(tmp_path / "texts"), f"no images under {tmp_path / 'texts'}")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "a.txt").write_text("words")
    refused(lambda: list_dataset(tmp_path / "top"), f"no images under {tmp_path / 'top'}", "e.g. a.txt")
    (tmp_path / "top" / "labels.csv").write_text("path,label\n")
    (tmp_path / "top" / "img").mkdir()  # class folders, or the images the CSV names? the user says which
    refused(lambda: list_dataset(tmp_path / "top"), "holds folders and labels.csv", "data.dataset.format")
    picture(tmp_path / "mixed" / "train" / "cat" / "1.png")
    picture(tmp_path / "mixed" / "dog" / "1.png")
    refused(lambda: list_dataset(tmp_path / "mixed"), "train/ beside other folders (dog)")
    refused(lambda: list_dataset(tmp_path / "missing"), tmp_path / "missing", "no such file")
    refused(lambda: list_dataset(tmp_path / "ok", fmt="tar"), "unknown dataset format 'tar'")


def test_a_link_out_of_the_dataset_is_refused_naming_the_link(tmp_path):
    picture(tmp_path / "d" / "cat" / "1.png")
    os.symlink("/etc", tmp_path / "d" / "cat" / "etc")
    refused(lambda: list_dataset(tmp_path / "d"), tmp_path / "d" / "cat" / "etc", "outside", "refused")
    os.unlink(tmp_path / "d" / "cat" / "etc")
    os.symlink("/etc/hostname", tmp_path / "d" / "cat" / "host.png")
    refused(lambda: list_dataset(tmp_path / "d"), tmp_path / "d" / "cat" / "host.png", "symbolic link")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    picture(tmp_path / "d" / "cat" / "1.png")
    os.mkfifo(tmp_path / "d" / "cat" / "2.png")  # opening it for reading would wait for a writer forever
    refused(lambda: list_dataset(tmp_path / "d"), tmp_path / "d" / "cat" / "2.png", "FIFO")
    os.mkfifo(tmp_path / "pipe.csv")
    refused(lambda: list_dataset(tmp_path / "pipe.csv"), tmp_path / "pipe.csv", "FIFO")


def test_more_images_than_max_files_is_refused_naming_the_setting(tmp_path):
    for i in range(4):
        picture(tmp_path / "cat" / f"{i}.png")
    assert len(list_dataset(tmp_path, max_files=4).items) == 4
    refused(lambda: list_dataset(tmp_path, max_files=3), "more than 3 images", "data.max_files")


# --------------------------------------------------------------------------- CSV

def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def kaggle(path, n, labelled=True, side=2, start=0):
    header = (["label"] if labelled else []) + [f"pixel{i}" for i in range(side * side)]
    rows = [([str((start + k) % 3)] if labelled else []) + [str((k * 7 + i) % 256) for i in range(side * side)]
            for k in range(n)]
    return write_csv(path, [header] + rows)


def test_kaggle_csvs_give_a_pool_and_a_predict_split(tmp_path):
    kaggle(tmp_path / "train.csv", 5)
    kaggle(tmp_path / "test.csv", 2, labelled=False)
    write_csv(tmp_path / "sample_submission.csv", [["ImageId", "Label"], ["1", "0"]])
    got = list_dataset(tmp_path)
    assert got.format == "csv" and got.items == [] and set(got.arrays) == {"pool", "predict"}
    pool, predict = got.arrays["pool"], got.arrays["predict"]
    assert pool.images.shape == (5, 2, 2) and pool.images.dtype == np.uint8 and pool.labels.dtype == np.int64
    assert pool.labels.tolist() == [0, 1, 2, 0, 1] and got.class_names == ["0", "1", "2"]
    assert pool.images[1].ravel().tolist() == [7, 8, 9, 10] and pool.rows[1] == "train.csv:3"
    assert predict.labels.tolist() == [-1, -1] and predict.where == "test.csv"
    assert ("sample_submission.csv", "a CSV not named train, test or val") in got.skipped
    assert got.files == [tmp_path / "test.csv", tmp_path / "train.csv"]
    by_file = list_dataset(tmp_path / "train.csv")  # the test file beside it is found by its name
    assert set(by_file.arrays) == {"pool", "predict"} and by_file.root == (tmp_path / "train.csv")
    kaggle(tmp_path / "test.csv", 2, start=2)  # labelled: a test split of its own
    assert set(list_dataset(tmp_path / "train.csv").arrays) == {"train", "test"}


def test_bad_kaggle_csvs_name_the_file_the_line_and_the_column(tmp_path):
    header = ["label"] + [f"pixel{i}" for i in range(4) if i != 2] + ["pixel4"]
    write_csv(tmp_path / "gap.csv", [header, ["1", "0", "0", "0", "0"]])
    refused(lambda: list_dataset(tmp_path / "gap.csv"), tmp_path / "gap.csv", "no column 'pixel2'")
    write_csv(tmp_path / "odd.csv", [["label", "pixel0", "pixel1", "pixel2"], ["1", "0", "0", "0"]])
    refused(lambda: list_dataset(tmp_path / "odd.csv"), "3 pixel columns, not the pixels of a square image")
    kaggle(tmp_path / "seven.csv", 3)
    rows = list(csv.reader(open(tmp_path / "seven.csv")))
    rows[2][0] = "seven"
    write_csv(tmp_path / "seven.csv", rows)
    msg = refused(lambda: list_dataset(tmp_path / "seven.csv"))
    assert msg == f"{tmp_path / 'seven.csv'}: line 3: label 'seven' is neither an integer nor a class name"
    rows[2][0], rows[3][3] = "1", "300"
    write_csv(tmp_path / "pixel.csv", rows)
    refused(lambda: list_dataset(tmp_path / "pixel.csv"), "pixel.csv: line 4: pixel2 is '300'")
    rows[3] = rows[3][:-1]
    write_csv(tmp_path / "short.csv", rows)
    refused(lambda: list_dataset(tmp_path / "short.csv"), "short.csv: line 4: 4 cells, the header has 5")
    kaggle(tmp_path / "nolabel.csv", 2, labelled=False)
    unlabelled = list_dataset(tmp_path / "nolabel.csv")  # Kaggle's test.csv: images for predict only
    assert list(unlabelled.arrays) == ["predict"] and unlabelled.class_names == []


def test_csv_cells_are_bounded_and_the_csv_modules_limit_is_set_back(tmp_path):
    before = csv.field_size_limit()
    write_csv(tmp_path / "long.csv", [["path", "label"], ["x" * 5000 + ".png", "cat"]])
    refused(lambda: list_dataset(tmp_path / "long.csv"), "long.csv: line 2: not valid CSV", "field larger")
    assert csv.field_size_limit() == before
    (tmp_path / "empty.csv").write_text("")
    refused(lambda: list_dataset(tmp_path / "empty.csv"), "empty.csv: an empty CSV")
    (tmp_path / "latin.csv").write_bytes(b"path,label\ncaf\xe9.png,a\n")
    refused(lambda: list_dataset(tmp_path / "latin.csv"), "latin.csv", "not UTF-8")


def test_a_csv_of_paths_and_class_names(tmp_path):
    picture(tmp_path / "img" / "a.png")
    picture(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "note.txt").write_text("x")
    write_csv(tmp_path / "labels.csv", [["path", "label"], ["img/b.png", "dog"], ["img/a.png", "cat"],
                                        ["img/gone.png", "cat"], ["img/note.txt", "cat"]])
    got = list_dataset(tmp_path / "labels.csv")
    assert got.format == "csv" and got.class_names == ["cat", "dog"]
    assert [(i.where, i.path.name, i.label, i.split) for i in got.items] == [
        ("labels.csv:2", "b.png", 1, "pool"), ("labels.csv:3", "a.png", 0, "pool")]
    assert [w for w, _ in got.skipped] == ["labels.csv:4", "labels.csv:5"]
    assert "No such file" in got.skipped[0][1] and "not an image" in got.skipped[1][1]
    assert got.files == sorted([tmp_path / "labels.csv", tmp_path / "img" / "a.png", tmp_path / "img" / "b.png"])


def test_bad_csvs_of_paths_name_the_line(tmp_path):
    picture(tmp_path / "d" / "a.png")
    picture(tmp_path / "outside.png")
    rows = [["path", "label"], ["a.png", "3"], ["a.png", "seven"], ["a.png", "1"]]
    write_csv(tmp_path / "d" / "ints.csv", rows)
    refused(lambda: list_dataset(tmp_path / "d" / "ints.csv"), "ints.csv: line 3: label 'seven' is neither")
    write_csv(tmp_path / "d" / "up.csv", [["path", "label"], ["../outside.png", "cat"]])
    refused(lambda: list_dataset(tmp_path / "d" / "up.csv"), "up.csv: line 2: ../outside.png leads to", "outside")
    write_csv(tmp_path / "d" / "cols.csv", [["file", "label"], ["a.png", "cat"]])
    refused(lambda: list_dataset(tmp_path / "d" / "cols.csv"), "cols.csv: line 1: no 'path' column")
    (tmp_path / "d" / "nul.csv").write_text("path,label\na\0.png,cat\n")
    refused(lambda: list_dataset(tmp_path / "d" / "nul.csv"), "nul.csv: line 2: a NUL byte in the path")
    (tmp_path / "d" / "quoted.csv").write_text('"path\nlabel",x\na.png,cat\n')  # a line break inside a cell
    refused(lambda: list_dataset(tmp_path / "d" / "quoted.csv"), "no 'path' column (the header is: path label, x)")
    os.mkfifo(tmp_path / "d" / "pipe.png")
    write_csv(tmp_path / "d" / "fifo.csv", [["path", "label"], ["pipe.png", "cat"]])
    refused(lambda: list_dataset(tmp_path / "d" / "fifo.csv"), "fifo.csv: line 2: pipe.png is a FIFO")


# --------------------------------------------------------------------------- NPZ

def test_npz_splits_class_names_and_pixel_scales(tmp_path):
    x = np.arange(5 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.array([0, 1, 2, 1, 0]), x_test=x[:2],
             y_test=np.array([2, 2]), class_names=np.array(["ant", "bee", "cow"]))
    got = list_dataset(tmp_path / "d.npz")
    assert got.format == "npz" and got.class_names == ["ant", "bee", "cow"] and set(got.arrays) == {"train", "test"}
    assert got.arrays[TRAIN].where == "d.npz[x_train]" and np.array_equal(got.arrays["test"].images, x[:2])
    assert got.files == [tmp_path / "d.npz"]
    rgb = np.linspace(0, 1, 2 * 2 * 2 * 3).reshape(2, 2, 2, 3)
    np.savez(tmp_path / "xy.npz", x=rgb, y=np.array([0, 4]))
    got = list_dataset(tmp_path / "xy.npz")
    assert set(got.arrays) == {"pool"} and got.class_names == [str(i) for i in range(5)]
    assert got.arrays["pool"].images.dtype == np.uint8 and got.arrays["pool"].images.max() == 255


def test_bad_npz_files_are_one_line(tmp_path):
    x = np.zeros((2, 3, 3), np.uint8)
    np.savez(tmp_path / "lab.npz", x_train=x, y_train=np.array([0, 3]), class_names=np.array(["a", "b"]))
    refused(lambda: list_dataset(tmp_path / "lab.npz"), "lab.npz[y_train]", "labels run from 0 to 3")
    np.savez(tmp_path / "obj.npz", x_train=np.array([{"a": 1}, None], dtype=object), y_train=np.array([0, 1]))
    refused(lambda: list_dataset(tmp_path / "obj.npz"), "obj.npz")
    np.savez(tmp_path / "cf.npz", x_train=np.zeros((2, 3, 8, 8), np.uint8), y_train=np.array([0, 1]))
    refused(lambda: list_dataset(tmp_path / "cf.npz"), "cf.npz[x_train]", "channels-first")
    np.savez(tmp_path / "n.npz", x_train=x, y_train=np.array([0, 1, 1]))
    refused(lambda: list_dataset(tmp_path / "n.npz"), "x_train has 2 images and y_train 3 labels")
    np.savez(tmp_path / "big.npz", x_train=np.full((2, 3, 3), 300.0), y_train=np.array([0, 1]))
    refused(lambda: list_dataset(tmp_path / "big.npz"), "pixel values from 300 to 300")
    np.savez(tmp_path / "half.npz", x_train=x, y_train=np.array([0, 1]), y_test=np.array([0]))
    refused(lambda: list_dataset(tmp_path / "half.npz"), "half.npz: has y_test but not x_test")
    np.savez(tmp_path / "y2d.npz", x_train=x, y_train=np.zeros((2, 2), np.int64))
    refused(lambda: list_dataset(tmp_path / "y2d.npz"), "y2d.npz[y_train]: shape (2, 2); expected labels (N,)")
    np.savez(tmp_path / "locked.npz", x_train=x, y_train=np.array([0, 1]))
    data = bytearray((tmp_path / "locked.npz").read_bytes())
    for at in (i for i in range(len(data) - 4) if data[i:i + 4] in (b"PK\x03\x04", b"PK\x01\x02")):
        data[at + (6 if data[at + 2] == 3 else 8)] |= 1  # the "encrypted" flag of each member
    (tmp_path / "locked.npz").write_bytes(bytes(data))
    refused(lambda: list_dataset(tmp_path / "locked.npz"), "locked.npz: not a readable .npz", "encrypted")
    np.savez(tmp_path / "none.npz", images=x)
    refused(lambda: list_dataset(tmp_path / "none.npz"), "needs arrays x_train and y_train")
    np.savez(tmp_path / "many.npz", x_train=np.zeros((5, 2, 2), np.uint8), y_train=np.zeros(5, np.int64))
    refused(lambda: list_dataset(tmp_path / "many.npz", max_files=4), "data.max_files")


# --------------------------------------------------------------------------- IDX

def idx(path, array, count=None, gz=True):
    head = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in
                                                   ((count if count is not None else len(array)),) + array.shape[1:])
    data = head + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_idx_pairs_give_train_and_test_with_numbered_classes(tmp_path):
    x = np.arange(3 * 2 * 3, dtype=np.uint8).reshape(3, 2, 3)
    idx(tmp_path / "train-images-idx3-ubyte.gz", x)
    idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 2, 1]))
    idx(tmp_path / "t10k-images-idx3-ubyte", x[:1], gz=False)
    idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([2]), gz=False)
    got = list_dataset(tmp_path)
    assert got.format == "idx" and set(got.arrays) == {"train", "test"} and got.class_names == ["0", "1", "2"]
    assert np.array_equal(got.arrays[TRAIN].images, x) and got.arrays[TRAIN].labels.tolist() == [0, 2, 1]
    assert got.arrays[TRAIN].where == "train-images-idx3-ubyte.gz" and len(got.files) == 4
    e = tmp_path / "emnist"
    e.mkdir()
    idx(e / "emnist-letters-train-images-idx3-ubyte.gz", x)
    idx(e / "emnist-letters-train-labels-idx1-ubyte.gz", np.array([1, 2, 3]))
    os.symlink("/etc", e / "unrelated")  # beside a named file, only its own IDX files are looked at
    got = list_dataset(e / "emnist-letters-train-images-idx3-ubyte.gz")
    assert set(got.arrays) == {"pool"} and got.arrays["pool"].images.shape == (3, 3, 2)  # EMNIST is stored transposed
    assert np.array_equal(got.arrays["pool"].images[1], x[1].T)


def test_an_idx_header_that_lies_or_pairs_that_disagree_are_refused(tmp_path):
    x = np.zeros((3, 2, 2), np.uint8)
    idx(tmp_path / "train-images-idx3-ubyte.gz", x, count=5)  # declares 5 images, holds 3
    idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, 1]))
    refused(lambda: list_dataset(tmp_path), "train-images-idx3-ubyte.gz", "IDX header promises")
    idx(tmp_path / "train-images-idx3-ubyte.gz", x)
    idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1]))
    refused(lambda: list_dataset(tmp_path), "3 images, but train-labels-idx1-ubyte.gz has 2 labels")
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    refused(lambda: list_dataset(tmp_path, "idx"), "no train-labels IDX file")
    os.mkfifo(tmp_path / "train-labels-idx1-ubyte")
    refused(lambda: list_dataset(tmp_path, "idx"), "train-labels-idx1-ubyte", "FIFO")
