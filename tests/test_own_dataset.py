"""The user's own dataset as convbn keeps it (data/own/dataset.py, cache.py) and as a config names it: decoded once,
cached by content, told apart when a file changes, split reproducibly, normalized per channel, and recorded in the
config (data.about) so that every later command knows its classes and shape. No TensorFlow here."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
from own_data import SHAPES, draw, write_folder

from convbn_cli.config import load_config
from convbn_cli.data import registry
from convbn_cli.data.own.dataset import load_own
from convbn_cli.errors import ConfigError, DataError

TRAIN = "train"  # (a literal [\"train\" index would put the test in the slow tier: conftest.TIERS)


def tree(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def load(root, tmp_path, log=None, **kw):
    return load_own(root, cache_root=tmp_path / "cache", log=(log.append if log is not None else lambda m: None),
                    progress=False, **kw)


def test_a_folder_is_decoded_once_then_read_from_the_cache_and_nothing_is_written_inside_it(tmp_path):
    root = write_folder(tmp_path / "shapes")
    before = tree(root)
    first = load(root, tmp_path)
    assert first.built and first.class_names == sorted(SHAPES) and first.image_shape == (20, 20, 1)
    assert first.size("train") == 18 and first.size("test") == 18 and "val" not in first.splits
    log = []
    again = load(root, tmp_path, log)
    assert not again.built and any("[cache]" in m for m in log)
    for split in (TRAIN, "test"):
        a, b = first.splits[split], again.splits[split]
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels) and a.where == b.where
        assert np.array_equal(a.hashes, b.hashes)
    assert again.content_hash == first.content_hash and again.mean == first.mean
    assert tree(root) == before  # nothing written, nothing touched inside the user's folder


def test_the_cache_is_keyed_by_content_a_touch_keeps_it_a_change_an_addition_or_a_removal_rebuilds_it(tmp_path):
    root = write_folder(tmp_path / "shapes")
    first = load(root, tmp_path)
    picture = root / "train" / "circle" / "0.png"
    os.utime(picture, ns=(1, 1))  # another mtime (as cp -p or tar would give), the same bytes
    log = []
    touched = load(root, tmp_path, log)
    assert not touched.built and any("content unchanged" in m for m in log)
    draw("cross", 99).save(picture)  # another picture under the same name and the old mtime
    os.utime(picture, ns=(1, 1))
    log = []
    changed = load(root, tmp_path, log)
    assert changed.built and changed.content_hash != first.content_hash
    assert any("1 file changed" in m for m in log)
    draw("cross", 100).save(root / "train" / "cross" / "new.png")
    (root / "test" / "square" / "24.png").unlink()
    log = []
    load(root, tmp_path, log)
    assert any("1 file added, 1 removed" in m or "1 file removed" in m and "1 file added" in m for m in log), log


def test_one_tree_is_split_by_name_hashes_stable_when_files_are_added(tmp_path):
    root = write_folder(tmp_path / "pool", per_class=40, splits=(None,))
    own = load(root, tmp_path, test_split=0.25)
    n_test, n = own.size("test"), own.size("train") + own.size("test")
    assert n == 120 and 0.15 < n_test / n < 0.35
    test_before = set(own.splits["test"].where)
    draw("circle", 500).save(root / "circle" / "extra.png")
    after = load(root, tmp_path, test_split=0.25)
    assert test_before <= set(after.splits["test"].where)  # no image moved between the splits
    assert not set(after.splits[TRAIN].where) & set(after.splits["test"].where)


def test_colour_images_get_a_mean_and_std_per_channel_from_the_training_split(tmp_path):
    root = write_folder(tmp_path / "colour", colour=True)
    own = load(root, tmp_path)
    assert own.image_shape == (20, 20, 3)
    x = own.splits[TRAIN].images.reshape(-1, 3) / 255.0
    assert np.allclose(own.mean, x.mean(0)) and np.allclose(own.std, x.std(0))
    assert own.mean[0] != pytest.approx(own.mean[2])  # the channels do differ, so one pair would be wrong
    entry = registry.own_entry(str(root), own.about())
    scale, offset = registry.pixel_affine(entry, "standardize")
    pixels = own.splits[TRAIN].images.astype(np.float64)
    z = pixels * np.asarray(scale) + np.asarray(offset)
    assert np.allclose(z.reshape(-1, 3).mean(0), 0, atol=1e-6) and np.allclose(z.reshape(-1, 3).std(0), 1, atol=1e-6)


RAW = {
    "data": {"batch_size": 4, "val_split": 0.2},
    "model": {"layers": [{"type": "conv", "filters": 4, "kernel": 3}, {"type": "global_pool"},
                         {"type": "dense", "units": "classes"}]},
    "train": {"epochs": 1},
}


def test_a_config_naming_a_folder_records_its_classes_shape_and_content_and_names_it_absolutely(tmp_path,
                                                                                                 monkeypatch):
    root = write_folder(tmp_path / "shapes", colour=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(raw=copy.deepcopy(RAW), overrides=["data.dataset=shapes"])
    assert cfg.own.path == str(root.resolve()) and cfg.own.format == "folder"
    assert cfg.dataset.class_names == tuple(sorted(SHAPES)) and cfg.model.input_shape == [20, 20, 3]
    assert cfg.model.layers[-1].units == len(SHAPES) and cfg.data.about.train_size == 18
    assert cfg.dataset_name == str(root.resolve())
    again = load_config(raw=cfg.model_dump(mode="json"))  # a run's config.yaml: nothing read again
    assert again.data.about == cfg.data.about and again.model.input_shape == [20, 20, 3]


def test_a_last_layer_that_does_not_fit_the_folders_classes_is_one_line_naming_both(tmp_path):
    root = write_folder(tmp_path / "shapes")
    raw = copy.deepcopy(RAW)
    raw["model"]["layers"][-1]["units"] = 10
    with pytest.raises(ConfigError) as e:
        load_config(raw=raw, overrides=[f"data.dataset={root}"])
    assert e.value.problems == [f"model.layers[2]: data.dataset {root.resolve()} has 3 classes, so the last layer "
                                "must be a dense layer with 3 units (the class logits), got a dense layer with 10 "
                                "units"]


def test_a_run_whose_dataset_changed_since_is_refused_in_one_line(tmp_path):
    from convbn_cli.data.load import dataset_arrays

    root = write_folder(tmp_path / "shapes")
    cfg = load_config(raw=copy.deepcopy(RAW), overrides=[f"data.dataset={root}"])
    arrays = dataset_arrays(cfg, log=lambda m: None, progress=False)
    assert arrays["x_train"].shape == (18, 20, 20, 1) and len(arrays["y_test"]) == 18
    draw("cross", 77).save(root / "train" / "circle" / "0.png")
    with pytest.raises(DataError, match="its files changed since this run read them"):
        dataset_arrays(cfg, log=lambda m: None, progress=False)


def _encrypted_flags(path) -> None:
    data = bytearray(path.read_bytes())
    for at in (i for i in range(len(data) - 4) if data[i:i + 4] in (b"PK\x03\x04", b"PK\x01\x02")):
        data[at + (6 if data[at + 2] == 3 else 8)] |= 1  # the "encrypted" flag of each member
    path.write_bytes(bytes(data))


def test_the_older_readers_refuse_a_fifo_an_encrypted_npz_and_take_a_limit_for_large_idx_files(tmp_path):
    """read_idx opened a FIFO with a plain open() (waiting forever for a writer); NumPy archives whose members are
    flagged as encrypted escaped as zipfile's RuntimeError (a traceback from `diagnose --data`); and read_idx's
    MNIST-sized bound refused EMNIST byclass (547 MB) whatever the caller allowed."""
    import gzip
    import struct

    from convbn_cli.data.external import load_npz_arrays
    from convbn_cli.data.formats import read_idx, read_npz

    os.mkfifo(tmp_path / "pipe-idx3-ubyte")
    with pytest.raises(DataError, match="FIFO"):
        read_idx(tmp_path / "pipe-idx3-ubyte")
    np.savez(tmp_path / "locked.npz", x=np.zeros((2, 3, 3), np.uint8), y=np.zeros(2, np.int64), x_train=np.zeros(1),
             y_train=np.zeros(1), x_test=np.zeros(1), y_test=np.zeros(1))
    _encrypted_flags(tmp_path / "locked.npz")
    with pytest.raises(DataError, match="not a readable"):
        load_npz_arrays(tmp_path / "locked.npz", ("x", "y"), 1 << 20, "")
    with pytest.raises(DataError, match="not a readable npz"):
        read_npz(tmp_path / "locked.npz")
    images = np.arange(2 * 300 * 300, dtype=np.uint32).astype(np.uint8).reshape(2, 300, 300)
    (tmp_path / "big-idx3-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + struct.pack(">III", 2, 300, 300)
                                                               + images.tobytes()))
    with pytest.raises(DataError, match=r"more than any MNIST-like file \(97.7 KiB at most\)"):
        read_idx(tmp_path / "big-idx3-ubyte.gz", limit=100_000)
    assert np.array_equal(read_idx(tmp_path / "big-idx3-ubyte.gz", limit=200_000), images)


def test_the_docs_table_of_data_check_lists_exactly_the_ids_the_checks_emit():
    import ast
    import re
    from pathlib import Path

    import convbn_cli.analysis.dataset_checks as checks

    tree = ast.parse(Path(checks.__file__).read_text())
    emitted = {node.args[0].value for node in ast.walk(tree) if isinstance(node, ast.Call)
               and getattr(node.func, "id", None) == "DataFinding" and node.args
               and isinstance(node.args[0], ast.Constant)}
    docs = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text()
    section = docs[docs.index("`convbn data check PATH` (and `train`"):]
    documented = set(re.findall(r"`([a-z_]+)`", "\n".join(line.split("|")[1] for line in section.splitlines()
                                                          if line.startswith("| `"))))
    assert emitted and documented == emitted


def test_data_info_lists_the_users_datasets_the_cache_holds(tmp_path):
    from convbn_cli.data.own.cache import own_caches
    from convbn_cli.present.reports import DataInfoReport

    root = write_folder(tmp_path / "shapes")
    load(root, tmp_path)
    (listed,) = own_caches(tmp_path / "cache")
    assert listed["dataset"] == str(root.resolve()) and listed["images"] == 36 and listed["classes"] == 3
    assert listed["image_shape"] == [20, 20, 1] and listed["size_bytes"] > 36 * 20 * 20
    text = DataInfoReport(str(tmp_path / "cache"), [], [listed]).render()
    assert f"{root.resolve()} (folder): 36 images of 20x20x1 (pad), 3 classes" in text


def test_per_channel_normalization_and_its_inverse_in_the_pipeline(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from convbn_cli.data.pipeline import normalizer, pixels_of

    root = write_folder(tmp_path / "colour", colour=True)
    cfg = load_config(raw=copy.deepcopy(RAW), overrides=[f"data.dataset={root}", "data.normalize=standardize"])
    pixels = tf.constant(np.random.default_rng(0).integers(0, 256, (4, 20, 20, 3)), tf.float32)
    z = normalizer(cfg)(pixels).numpy()
    mean, std = np.array(cfg.data.about.mean), np.array(cfg.data.about.std)
    np.testing.assert_allclose(z, (pixels.numpy() / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pixels_of(cfg)(z).numpy(), pixels.numpy(), atol=1e-3)


def test_a_kaggle_test_csv_without_labels_is_images_to_predict_and_not_a_training_set(tmp_path):
    from convbn_cli.data.own.listing import list_dataset

    side = 4
    rows = [",".join(f"pixel{i}" for i in range(side * side))] + [",".join(["7"] * side * side)] * 3
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    listing = list_dataset(tmp_path / "test.csv", "csv")
    (only,) = listing.arrays.items()
    assert only[0] == "predict" and only[1].images.shape == (3, side, side) and list(only[1].labels) == [-1] * 3
    with pytest.raises(DataError, match=r"test.csv: no 'label' column: images without labels are for `convbn "
                       "predict`"):
        load(tmp_path / "test.csv", tmp_path)


def test_large_pictures_are_decoded_on_every_core_small_ones_on_one():
    from types import SimpleNamespace

    from convbn_cli.data.own.dataset import _decode_workers

    small = [SimpleNamespace(h=28, w=28)] * 5 + [SimpleNamespace(h=3000, w=4000)] * 2
    large = [SimpleNamespace(h=768, w=1024)] * 5 + [SimpleNamespace(h=28, w=28)] * 2
    assert _decode_workers(small) == 1 and _decode_workers(large) == (os.cpu_count() or 1)


def test_a_new_run_from_an_old_runs_config_reads_the_dataset_as_it_is_now(tmp_path):
    """An old run's config.yaml records data.about; training anew from it (a config file) reads today's files, where
    the run's own commands (RunDir.load_config) keep what the run read and refuse a dataset changed since."""
    import yaml

    from convbn_cli.config import dump_config
    from convbn_cli.runs.rundir import RunDir

    root = write_folder(tmp_path / "shapes")
    old = load_config(raw=copy.deepcopy(RAW), overrides=[f"data.dataset={root}"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(old))
    draw("cross", 123).save(root / "train" / "cross" / "extra.png")
    fresh = load_config(run / "config.yaml", log=lambda m: None, progress=False)
    assert fresh.data.about.train_size == old.data.about.train_size + 1
    assert fresh.data.about.content_hash != old.data.about.content_hash
    kept = RunDir(run).load_config()
    assert kept.data.about == old.data.about and yaml.safe_load((run / "config.yaml").read_text())["data"]["about"]


# ---------------------------------------------------------------------- found by the review of the first version

def test_a_sweep_shares_arrays_only_between_runs_that_read_the_dataset_alike(tmp_path):
    from convbn_cli.data.load import dataset_key

    root = write_folder(tmp_path / "pool", per_class=10, splits=(None,))
    a = load_config(raw=copy.deepcopy(RAW), overrides=[f"data.dataset={root}", "data.test_split=0.2"])
    b = load_config(raw=copy.deepcopy(RAW), overrides=[f"data.dataset={root}", "data.test_split=0.5"])
    c = load_config(raw=copy.deepcopy(RAW), overrides=[f"data.dataset={root}", "data.test_split=0.2",
                                                       "train.epochs=3"])
    assert dataset_key(a) != dataset_key(b) and dataset_key(a) == dataset_key(c)
    assert a.data.about.test_size != b.data.about.test_size


def test_a_symbolic_link_moved_to_another_class_is_a_changed_dataset(tmp_path):
    root = write_folder(tmp_path / "shapes", splits=(None,))
    (root / "circle" / "link.png").symlink_to(root / "cross" / "12.png")
    first = load(root, tmp_path)
    (root / "circle" / "link.png").rename(root / "square" / "link.png")
    log = []
    again = load(root, tmp_path, log)
    assert again.built and again.content_hash != first.content_hash
    labels = {w: int(lab) for d in again.splits.values() for w, lab in zip(d.where, d.labels)}
    assert labels["square/link.png"] == again.class_names.index("square")


def test_copies_of_one_picture_fall_on_one_side_of_the_pool_split_and_a_new_row_moves_nothing(tmp_path):
    root = write_folder(tmp_path / "pool", per_class=30, splits=(None,))
    for k in range(10):
        draw("circle", 0).save(root / "circle" / f"copy{k}.png")  # draw("circle", 0) is 0.png's picture
    own = load(root, tmp_path, test_split=0.3)
    sides = {split for split, d in own.splits.items() for w in d.where if w.startswith("circle/copy")
             or w == "circle/0.png"}
    assert len(sides) == 1
    test_before = set(own.splits["test"].where)
    draw("square", 999).save(root / "square" / "new.png")
    assert test_before <= set(load(root, tmp_path, test_split=0.3).splits["test"].where)


def test_the_validation_tail_holds_every_class_in_its_share(tmp_path):
    root = tmp_path / "uneven"
    for kind, count in (("circle", 100), ("square", 12), ("cross", 40)):
        (root / kind).mkdir(parents=True)
        for k in range(count):
            draw(kind, 1000 * SHAPES[kind] + k).save(root / kind / f"{k}.png")
    own = load(root, tmp_path, test_split=0.01)
    labels = own.splits[TRAIN].labels
    tail = labels[len(labels) - int(round(len(labels) * 0.1)):]
    assert set(np.unique(tail)) == {0, 1, 2}
    assert np.bincount(tail, minlength=3).tolist() == pytest.approx(
        [0.1 * c for c in np.bincount(labels, minlength=3)], abs=1)


def test_a_run_on_a_changed_dataset_is_refused_before_anything_is_decoded_or_cached(tmp_path):
    root = write_folder(tmp_path / "shapes")
    first = load(root, tmp_path)
    manifest = next((tmp_path / "cache" / "own").glob("*/manifest.json"))
    before = manifest.read_bytes()
    draw("cross", 55).save(root / "train" / "circle" / "0.png")
    log = []
    with pytest.raises(DataError, match="its files changed since this run read them"):
        load(root, tmp_path, log, expect_hash=first.content_hash)
    assert manifest.read_bytes() == before and not any("decoding" in m for m in log)


def test_arrays_are_capped_like_pictures_and_one_class_is_refused_before_decoding(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (12, 100, 100), np.uint8)
    np.savez(tmp_path / "big.npz", x_train=x, y_train=np.arange(12) % 3, x_test=x[:3], y_test=np.arange(3))
    assert load(tmp_path / "big.npz", tmp_path).image_shape == (64, 64, 1)
    (tmp_path / "one" / "cat").mkdir(parents=True)
    draw("circle", 1).save(tmp_path / "one" / "cat" / "1.png")
    with pytest.raises(DataError, match="1 class \\(cat\\); a classifier needs at least two"):
        load(tmp_path / "one", tmp_path)


def test_a_csv_named_by_its_path_notices_a_test_csv_put_beside_it_and_a_named_picture_put_back(tmp_path):
    folder = tmp_path / "csvset"
    write_folder(folder / "images", per_class=4, splits=(None,))
    rows = ["path,label"] + [f"images/{p.parent.name}/{p.name},{p.parent.name}"
                             for p in sorted((folder / "images").rglob("*.png"))]
    missing = folder / "images" / "cross" / "8.png"
    missing.rename(tmp_path / "aside.png")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    first = load(folder / "train.csv", tmp_path)
    assert first.size(TRAIN) + first.size("test") == 11
    (tmp_path / "aside.png").rename(missing)
    again = load(folder / "train.csv", tmp_path)
    assert again.built and again.size(TRAIN) + again.size("test") == 12
    (folder / "test.csv").write_text("\n".join(rows[:4]) + "\n")
    with_test = load(folder / "train.csv", tmp_path)
    assert with_test.built and with_test.size("test") == 3


def test_predict_reads_only_the_csv_it_is_given_not_the_test_csv_beside_it(tmp_path):
    from convbn_cli.analysis.predict import load_pixel_csv

    header = ",".join(f"pixel{i}" for i in range(16))
    (tmp_path / "train.csv").write_text("label," + header + "\n" + "\n".join(f"{k % 2}," + ",".join(["9"] * 16)
                                                                             for k in range(4)) + "\n")
    (tmp_path / "test.csv").write_text(header + "\n" + ",".join(["200"] * 16) + "\n")
    rows, x = load_pixel_csv(tmp_path / "train.csv", (4, 4, 1), "pad", 100)
    assert rows == [f"train.csv:{line}" for line in range(2, 6)] and x.shape == (4, 4, 4) and (x == 9).all()
    rows, x = load_pixel_csv(tmp_path / "test.csv", (4, 4, 1), "pad", 100)
    assert rows == ["test.csv:2"] and (x == 200).all()
