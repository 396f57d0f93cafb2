"""`convbn data check`'s checks (analysis/dataset_checks.py) and their report (present/dataset_report.py), on small
datasets built here as plain objects shaped like data/own's OwnData and Decoded: planted duplicates within and
across splits, conflicting labels, skipped files, imbalance, a class missing from train, a class smaller than a
batch, mixed sizes and channels, and a clean dataset that shows none of them. No TensorFlow, no files."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from convbn_cli.analysis.dataset_checks import EXAMPLES_KEPT, IMBALANCE, check_dataset, describe_resize
from convbn_cli.present.dataset_report import SHOWN, DataCheckReport

NAMES = ["cat", "dog", "fox"]
TRAIN = "train"  # a name: conftest.py takes a subscript by the literal "train" in a test for training


@dataclass
class Split:  # data/own's Decoded, as far as the checks read it
    images: np.ndarray
    labels: np.ndarray
    where: list
    original: np.ndarray
    hashes: np.ndarray


@dataclass
class Own:  # data/own's OwnData
    splits: dict
    class_names: list = field(default_factory=lambda: list(NAMES))
    skipped: list = field(default_factory=list)
    image_shape: tuple = (28, 28, 1)
    resize: str = "pad"
    root: Path = Path("/data/pets")
    format: str = "folder"
    content_hash: str = "0123456789abcdef0123"


_serial = iter(range(10**9))


def split(name: str, per_class: list, size=(28, 28, 1)) -> Split:
    """`per_class[k]` images of class k, each with a hash of its own and a path naming its split and class."""
    labels = np.repeat(np.arange(len(per_class)), per_class).astype(np.int64)
    n = len(labels)
    where = [f"{name}/{NAMES[c] if c < len(NAMES) else c}/{i}.png" for i, c in enumerate(labels)]
    hashes = np.array([b"%016d" % next(_serial) for _ in range(n)], dtype="S16")
    return Split(np.zeros((n, 2, 2, 1), np.uint8), labels, where, np.tile(np.int32(size), (n, 1)), hashes)


def clean() -> Own:
    return Own({"train": split("train", [200, 210, 190]), "test": split("test", [40, 40, 40])})


def ids(check, severity=None) -> list:
    return [f.id for f in check.findings if severity is None or f.severity == severity]


def finding(check, id_):
    (f,) = [f for f in check.findings if f.id == id_]
    return f


def test_a_clean_dataset_has_no_warning_or_error():
    own = clean()
    hashes = np.concatenate([s.hashes for s in own.splits.values()])
    assert len(np.unique(hashes)) == len(hashes) == 720  # clean by construction: no two images alike
    check = check_dataset(own)
    assert ids(check, "error") == ids(check, "warning") == [] and not check.refused
    assert check.counts == {"train": [200, 210, 190], "test": [40, 40, 40]}
    assert check.imbalance[TRAIN]["ratio"] == pytest.approx(210 / 190)
    text = DataCheckReport(check).render()
    assert "verdict: no problems found" in text and "warning" not in text
    assert "dataset: /data/pets (folder), 720 images (train 600, test 120) as 28x28x1 (resize: pad)" in text
    assert "content 0123456789ab" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()[:1] in (
        ["cat"], ["dog"], ["fox"], ["total"])}
    assert rows == {"cat": ["200", "40", "240"], "dog": ["210", "40", "250"], "fox": ["190", "40", "230"],
                    "total": ["600", "120", "720"]}


def test_duplicates_within_train_are_counted_and_named():
    own = clean()
    train = own.splits[TRAIN]
    train.hashes[[5, 6, 7]] = train.hashes[4]  # four copies of one image: three extra
    train.hashes[300] = train.hashes[301]
    check = check_dataset(own)
    f = finding(check, "duplicates_within_split")
    assert (f.severity, f.count, f.evidence) == ("info", 4, {"extra_copies": {"train": 4}})
    assert any("train/cat/4.png [cat] = train/cat/5.png [cat]" in e for e in f.examples)
    assert "duplicates_across_splits" not in ids(check) and "conflicting_labels" not in ids(check)
    text = DataCheckReport(check).render()
    assert "duplicates_within_split: 4 image(s) are exact copies" in text and "train/dog/301.png" in text


def test_duplicates_across_train_and_test_and_a_conflicting_label_are_warnings():
    own = clean()
    train, test = own.splits[TRAIN], own.splits["test"]
    test.hashes[:12] = train.hashes[:12]  # 12 test cats that are training cats
    test.hashes[50] = train.hashes[250]  # a test dog (index 50 of test: class 1) that is a training dog
    test.hashes[100] = train.hashes[30]  # a test fox that is a training cat: the labels conflict
    check = check_dataset(own)
    f = finding(check, "duplicates_across_splits")
    assert f.severity == "warning" and f.count == 14 == f.evidence["images"]["test in train"]
    assert "14 test image(s) (11.7% of test) also in train" in f.message
    conflict = finding(check, "conflicting_labels")
    assert conflict.severity == "warning" and conflict.count == 1
    assert conflict.examples == ["train/cat/30.png [cat] = test/fox/100.png [fox]"]
    assert check.findings[0].id == "duplicates_across_splits"  # the worst warning first
    text = DataCheckReport(check).render()
    assert "warning (2):" in text and f"... and {14 - SHOWN} more" in text
    assert "conflicting_labels: 1 set(s) of identical images carry different labels (2 images)" in text
    assert "verdict: 0 errors, 2 warnings, 0 notes; first: duplicates_across_splits" in text


def test_val_copies_of_training_images_are_found_too():
    own = clean()
    own.splits["val"] = split("val", [3, 3, 3])
    own.splits["val"].hashes[0] = own.splits[TRAIN].hashes[0]
    f = finding(check_dataset(own), "duplicates_across_splits")
    assert f.evidence["images"] == {"val in train": 1}


def test_skipped_files_are_listed_per_reason_and_refused_under_strict():
    own = clean()
    own.skipped = ([(f"train/cat/bad{i}.png", "truncated image") for i in range(7)]
                   + [("train/dog/empty.png", "zero bytes"), ("train/notes.txt", "not an image")])
    f = finding(check_dataset(own), "unreadable_files")
    assert f.severity == "warning" and f.count == 9
    assert f.evidence["reasons"] == {"truncated image": 7, "zero bytes": 1, "not an image": 1}
    assert "9 file(s) could not be used and were skipped (7 truncated image; 1 zero bytes; 1 not an image)" in f.message
    text = DataCheckReport(check_dataset(own)).render()
    assert "train/cat/bad0.png: truncated image" in text and "... and 4 more" in text
    strict = check_dataset(own, strict=True)
    assert strict.refused and finding(strict, "unreadable_files").severity == "error"
    assert DataCheckReport(strict).to_json()["refused"] is True
    text = DataCheckReport(strict).render()
    assert "verdict: refused (1 error, 0 warnings, 0 notes); first: unreadable_files" in text
    assert not check_dataset(clean(), strict=True).refused  # strict alone refuses nothing


def test_imbalance_above_the_threshold_is_named_with_its_classes():
    own = Own({"train": split("train", [1000, 100, 500]), "test": split("test", [50, 50, 50])})
    f = finding(check_dataset(own), "class_imbalance")
    assert f.severity == "warning" and f.evidence["ratios"] == {"train": 10.0}
    assert "train 10.0x, 'cat' 1,000 vs 'dog' 100 images" in f.message
    assert "train: largest/smallest 10.0x ('cat' 1,000, 'dog' 100)" in DataCheckReport(check_dataset(own)).render()
    assert json.loads(json.dumps(DataCheckReport(check_dataset(own)).to_json()))["imbalance"][TRAIN]["ratio"] == 10
    below = Own({"train": split("train", [int(IMBALANCE * 100), 100, 200]), "test": split("test", [5, 5, 5])})
    assert "class_imbalance" not in ids(check_dataset(below))  # exactly the threshold: not flagged


def test_a_test_class_missing_from_train_is_named():
    own = Own({"train": split("train", [300, 300, 0]), "test": split("test", [20, 20, 20])})
    check = check_dataset(own)
    f = finding(check, "class_missing_from_train")
    assert f.severity == "warning" and f.evidence["classes"] == ["fox"]
    assert f.examples == ["fox: 20 test image(s), 0 in train"]
    assert "class_missing_from_train" in DataCheckReport(check).render()


def test_a_class_with_fewer_images_than_a_batch_is_named():
    own = Own({"train": split("train", [128, 127, 300]), "test": split("test", [5, 5, 5])})
    f = finding(check_dataset(own, batch_size=128), "class_smaller_than_batch")
    assert f.evidence == {"batch_size": 128, "classes": {"dog": 127}}  # 128 (one whole batch) is enough
    assert "class_smaller_than_batch" not in ids(check_dataset(own, batch_size=64))
    assert "1 class(es) have fewer training images than one batch (128): 'dog'" in DataCheckReport(
        check_dataset(own)).render()


def test_an_empty_test_split_and_an_empty_training_split():
    own = Own({"train": split("train", [200, 200, 200]), "test": split("test", [0, 0, 0])})
    assert ids(check_dataset(own)) == ["test_split_empty"]
    del own.splits["test"]
    assert ids(check_dataset(own)) == ["test_split_empty"]
    empty = Own({"train": split("train", [0, 0, 0]), "test": split("test", [5, 5, 5])})
    check = check_dataset(empty)
    assert check.refused and ids(check, "error") == ["no_training_images"]
    assert "class_missing_from_train" not in ids(check)  # said once, by the error


def test_mixed_sizes_and_channels_say_what_the_resize_rule_did():
    own = clean()
    original = own.splits[TRAIN].original
    original[:412] = (64, 48, 3)  # colour, larger: scaled down and padded
    original[412:420] = (14, 14, 1)  # smaller: scaled up, no padding needed
    check = check_dataset(own)
    f = finding(check, "mixed_sizes")
    assert f.severity == "info" and f.evidence["upscaled"] == 8 and f.evidence["downscaled"] == 412
    assert f.examples == ["412 image(s) of 64x48: scaled down x0.438, padded to 28x28 (aspect kept)",
                          "300 image(s) of 28x28: kept as it is",
                          "8 image(s) of 14x14: scaled up x2 to 28x28"]
    channels = finding(check, "mixed_channels")
    assert channels.severity == "warning" and channels.evidence["channels"] == {"1": 308, "3": 412}
    text = DataCheckReport(check).render()
    assert "412 image(s) RGB (3 channels): converted to grey" in text and "mixed_sizes: images come in 3 sizes" in text
    assert json.loads(json.dumps(DataCheckReport(check).to_json()))["findings"][0]["evidence"]["channels"] == {
        "1": 308, "3": 412}  # numpy integers turned into JSON's


def test_one_size_for_every_image_is_a_single_note():
    own = Own({"train": split("train", [200, 200, 200], (32, 32, 3)), "test": split("test", [9, 9, 9], (32, 32, 3))})
    check = check_dataset(own)
    assert ids(check) == ["resized", "channels_converted"] and not ids(check, "warning")
    assert finding(check, "resized").message == "every image is 32x32, resized to 28x28: scaled down x0.875 to 28x28"


def test_describe_resize_per_rule():
    assert describe_resize(64, 48, (28, 28), "fit") == (
        "scaled down x0.583, cropped at the centre to 28x28 (aspect kept)")
    assert describe_resize(20, 28, (28, 28), "pad") == "not scaled, padded to 28x28 (aspect kept)"
    assert describe_resize(64, 48, (28, 28), "stretch") == (
        "stretched to 28x28 (x0.438 in height, x0.583 in width: aspect changed)")
    assert describe_resize(28, 28, (28, 28), "pad") == "kept as it is"


def test_examples_are_capped_and_the_json_is_json():
    own = clean()
    own.splits["test"].hashes[:] = own.splits[TRAIN].hashes[:120]
    report = DataCheckReport(check_dataset(own))
    out = json.loads(json.dumps(report.to_json()))
    (f,) = [f for f in out["findings"] if f["id"] == "duplicates_across_splits"]
    assert f["count"] == 120 and len(f["examples"]) == EXAMPLES_KEPT
    assert out["counts"][TRAIN] == {"cat": 200, "dog": 210, "fox": 190} and out["refused"] is False
    assert out["severity_counts"] == {"error": 0, "warning": 2, "info": 0}  # test's dogs and foxes: train cats
    assert [f["count"] for f in out["findings"] if f["id"] == "conflicting_labels"] == [80]
    assert "... and 115 more" in report.render()
    assert report.summary().splitlines()[1].startswith("  warning: duplicates_across_splits: exact copies")


def test_seventy_thousand_hashes_are_checked_in_well_under_a_second():
    rng = np.random.default_rng(0)
    n = 70_000
    hashes = rng.integers(0, 2**63, (n, 2), dtype=np.int64).view("S16").reshape(-1).copy()
    hashes[60_000:60_500] = hashes[:500]  # 500 test images that are training images
    labels = np.tile(np.arange(10), n // 10).astype(np.int64)
    whole = Split(np.zeros((n, 1, 1, 1), np.uint8), labels, [f"x[{i}]" for i in range(n)],
                  np.tile(np.int32([28, 28, 1]), (n, 1)), hashes)

    def part(s):
        return Split(whole.images[s], whole.labels[s], whole.where[s], whole.original[s], whole.hashes[s])

    own = Own({"train": part(slice(0, 60_000)), "test": part(slice(60_000, n))},
              class_names=[str(c) for c in range(10)])
    start = time.perf_counter()
    check = check_dataset(own)
    took = time.perf_counter() - start
    assert finding(check, "duplicates_across_splits").count == 500
    assert took < 1.0, f"{took:.2f} s for 70,000 images"


def test_a_class_with_no_image_anywhere_is_named():
    """Labels 1..3 in a dataset whose class names run 0..3 leave class '0' empty: named, not passed over."""
    from types import SimpleNamespace

    from convbn_cli.analysis.dataset_checks import check_dataset

    def split(labels):
        n = len(labels)
        return SimpleNamespace(images=np.zeros((n, 2, 2, 1), np.uint8), labels=np.array(labels, np.int64),
                               where=[f"x[{i}]" for i in range(n)], original=np.tile([2, 2, 1], (n, 1)),
                               hashes=np.array([bytes([i % 256, i // 256]) * 8 for i in range(n)], "S16"))

    own = SimpleNamespace(splits={"train": split([1, 2, 3] * 4), "test": split([1, 2, 3])},
                          class_names=["0", "1", "2", "3"], skipped=[], image_shape=(2, 2, 1), resize="pad",
                          root="/x", format="npz", content_hash="0" * 64)
    found = {f.id: f for f in check_dataset(own, batch_size=2).findings}
    assert "empty_class" in found and "'0'" in found["empty_class"].message
    own.class_names = ["1", "2", "3"]
    own.splits = {"train": split([0, 1, 2] * 4), "test": split([0, 1, 2])}
    assert "empty_class" not in {f.id for f in check_dataset(own, batch_size=2).findings}
