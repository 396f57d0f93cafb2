"""The user's own dataset (`data.dataset: PATH`) as convbn uses it: image folders, a CSV, an NPZ or IDX files,
listed and bounded (listing.py), decoded once and brought to one image shape (decode.py), then kept in convbn's
cache (cache.py), so that every later run loads arrays about as quickly as MNIST's. Nothing is ever written
inside the dataset's folder.

`load_own` is the one way in: it returns an OwnData, whose splits the trainer, `convbn data check` and every
command that measures a run use alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ...errors import ConvbnError, DataError
from . import cache
from .decode import Decoded, convert_arrays, decode_items, probe

SPLIT_ORDER = ("train", "val", "test", "predict")
LARGEST_DEFAULT_SIDE = 64  # images larger than this (by their most common size) are brought down to it by default
FIELDS = ("images", "labels", "where", "original", "hashes")


@dataclass
class OwnData:
    """The user's dataset as convbn uses it: every split's images in one shape, and what was read."""

    root: Path
    format: str  # folder | csv | npz | idx
    class_names: list
    image_shape: tuple  # (height, width, channels) every image was brought to
    resize: str  # pad | fit | stretch
    splits: dict  # "train", "val" (when the dataset has one), "test", "predict" (unlabelled rows) -> Decoded
    skipped: list  # (where, why): every file not used, never silently
    content_hash: str
    mean: list = field(default_factory=list)  # per channel, pixels in [0, 1], of the training images
    std: list = field(default_factory=list)
    built: bool = False  # decoded this time (not read from the cache): `train` shows the data check then

    def arrays(self) -> dict:
        """x_/y_ arrays per split, as data.pipeline.make_splits takes them."""
        out = {}
        for split in ("train", "val", "test"):
            d = self.splits.get(split)
            out[f"x_{split}"] = d.images if d is not None else np.zeros((0, *self.image_shape), np.uint8)
            out[f"y_{split}"] = d.labels if d is not None else np.zeros((0,), np.int64)
        return out

    def size(self, split: str) -> int:
        return len(self.splits[split].labels) if split in self.splits else 0

    @property
    def digits(self) -> bool:
        """Classes 0-9 drawn light on a dark ground (the border of the training images is dark), as MNIST's: then
        predict prepares a photographed picture as it does for MNIST (analysis/pictures.py)."""
        train = self.splits.get("train")
        if list(self.class_names) != list("0123456789") or self.image_shape[2] != 1 or train is None \
                or not len(train.labels):
            return False
        x = train.images[:2000, :, :, 0]
        border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
        return float(np.median(border)) < 64

    def about(self) -> dict:
        """What the run records of the dataset (config's data.about, schema.DatasetFacts)."""
        return {"class_names": list(self.class_names), "image_shape": list(self.image_shape),
                "mean": list(self.mean), "std": list(self.std), "train_size": self.size("train"),
                "test_size": self.size("test"), "val_size": self.size("val"), "content_hash": self.content_hash,
                "digits": self.digits}


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr)


def for_config(cfg, log=stderr_log, progress: bool = True, expect_hash: Optional[str] = None) -> OwnData:
    """The user's dataset a config names (data.dataset, data.resize, data.test_split, data.max_files), in the
    config's model.input_shape when it gives one; its mean and std per channel are those of the images training
    learns from (data.max_train of them, less the validation images data.val_split holds out)."""
    from ..sources import cache_dir

    d, shape = cfg.data, cfg.model.input_shape
    own = load_own(cfg.own.path, cfg.own.format, resize=d.resize, shape=tuple(shape) if shape else None,
                   test_split=d.test_split, max_files=d.max_files, cache_root=cache_dir(), log=log,
                   progress=progress, expect_hash=expect_hash)
    if "val" not in own.splits:  # as data.pipeline.make_splits cuts them
        n = min(own.size("train"), d.max_train or own.size("train"))
        own.mean, own.std = channel_stats(own.splits["train"].images[: n - int(round(n * d.val_split))])
    return own


def load_own(path, fmt: str = "auto", *, resize: str = "pad", shape: Optional[tuple] = None,
             test_split: float = 0.2, max_files: int = 200_000, cache_root: Path, log=stderr_log,
             progress: bool = True, workers: int = 0, expect_hash: Optional[str] = None) -> OwnData:
    """The dataset at `path` from convbn's cache under `cache_root` when its files are unchanged, else listed,
    decoded (to `shape`, or the dataset's own) and cached. Bad input: one-line DataError naming the file.
    `expect_hash`: the content a run read; other content is refused before anything is decoded or cached."""
    root = Path(path).expanduser()
    if not root.exists() and not root.is_symlink():
        raise DataError(f"data.dataset: {path}: no such file or directory")
    root = root.resolve()
    # keyed without the format: `auto` and the format it resolves to (which the run's config records) share it
    folder = cache.entry_dir(cache_root, root, {"test_split": test_split, "max_files": max_files})
    wanted = list(shape) if shape else None
    manifest = _usable(cache.read_manifest(folder), fmt, resize, wanted, root, log)
    if manifest is not None:
        named = [] if root.is_dir() else [root.parent / f for f in manifest["files"]]
        if cache.states_digest(root, named) == manifest["states_digest"]:
            _check_expected(root, manifest["content_hash"], expect_hash)
            return _from_cache(root, folder, manifest, log)
    from .listing import list_dataset  # (CSV and archive readers: not needed when the cache holds the dataset)

    listing = list_dataset(root, fmt, max_files)
    files = [Path(f) for f in listing.files]
    digest = cache.content_hash(root, files, _listing_digest(listing), progress)
    _check_expected(root, digest, expect_hash)
    named = [] if root.is_dir() else files
    states, states_digest = cache.states_and_digest(root, named)  # one walk for both
    if manifest is not None and manifest.get("content_hash") == digest:
        log(f"[cache] {root}: files touched or copied, content unchanged: the cache holds it")
        cache.write_manifest(folder, {**manifest, "states_digest": states_digest}, states)
        return _from_cache(root, folder, manifest, log)
    if manifest is not None:
        log(f"[data] {root}: {cache.changes(cache.read_states(folder), states)} since it was cached; decoding "
            "again")
    own = _build(listing, resize, shape, test_split, workers, progress, log)
    own.content_hash = digest
    meta = {"root": str(root), "images": sum(len(d.labels) for d in own.splits.values()), "format": own.format,
            "class_names": own.class_names, "image_shape": list(own.image_shape),
            "resize": resize, "requested_shape": wanted, "content_hash": digest, "mean": own.mean, "std": own.std,
            "files": [cache.relative(f, root) for f in files], "states_digest": states_digest,
            "skipped": [list(s) for s in own.skipped]}
    try:
        cache.write(folder, meta, _flatten(own), states)
        log(f"[cache] {folder}")
    except (OSError, ConvbnError) as e:  # the data is good: use it anyway, just without a cache (a full disk)
        log(f"  could not write the cache {folder}: {getattr(e, 'strerror', None) or e}")
    return own


def _check_expected(root: Path, digest: str, expected: Optional[str]) -> None:
    if expected is not None and digest != expected:
        raise DataError(f"data.dataset {root}: its files changed since this run read them (content {digest[:12]}, "
                        f"the run's {expected[:12]}); results would be for other images")


def _listing_digest(listing) -> bytes:
    """What the listing made of the files, beside their bytes: each image's name, split and label (a symbolic
    link moved to another class folder keeps its target's bytes but changes its label), the class names and the
    format."""
    digest = hashlib.sha256(json.dumps([listing.format, list(listing.class_names)]).encode())
    for item in sorted((i.where, i.split, int(i.label)) for i in listing.items):
        digest.update(repr(item).encode("utf-8", "surrogateescape"))
    return digest.digest()


def _usable(manifest, fmt, resize, wanted, root, log):
    """The manifest when its arrays were read in the format asked for (any, for auto) and have the shape and
    resize rule asked for (or the dataset's own shape)."""
    if manifest is None:
        return None
    if fmt not in ("auto", manifest["format"]):
        log(f"[data] {root}: cached as {manifest['format']}; reading it again as {fmt}")
        return None
    if (manifest["resize"], manifest["requested_shape"]) == (resize, wanted) or \
            (manifest["resize"], manifest["image_shape"]) == (resize, wanted):
        return manifest
    log(f"[data] {root}: cached as {'x'.join(map(str, manifest['image_shape']))} ({manifest['resize']}); "
        f"decoding again for {'x'.join(map(str, wanted)) if wanted else 'its own shape'} ({resize})")
    return None


def _from_cache(root: Path, folder: Path, manifest: dict, log) -> OwnData:
    arrays = cache.read_arrays(folder, manifest.get("arrays_size"))
    splits = {}
    for split in SPLIT_ORDER:
        if f"{split}_labels" in arrays:
            splits[split] = Decoded(*(arrays[f"{split}_{k}"] for k in FIELDS), problems=[])
            splits[split].where = splits[split].where.tolist()
    log(f"[cache] {root} ({sum(len(d.labels) for d in splits.values())} images, {folder})")
    return OwnData(root, manifest["format"], list(manifest["class_names"]), tuple(manifest["image_shape"]),
                   manifest["resize"], splits, [tuple(s) for s in manifest["skipped"]], manifest["content_hash"],
                   list(manifest["mean"]), list(manifest["std"]))


def _flatten(own: OwnData) -> dict:
    out = {}
    for split, d in own.splits.items():
        for k in FIELDS:
            value = getattr(d, k)
            out[f"{split}_{k}"] = np.asarray(value, dtype=str) if k == "where" else value
    return out


def _build(listing, resize, shape, test_split, workers, progress, log) -> OwnData:
    """Decode every split of a listing to one shape, split off a test set where the dataset has none, and put
    the training images in a fixed order (by a hash of their names) so that the validation images, the last
    ones, are a sample of every class."""
    skipped = list(listing.skipped)
    if set(listing.arrays) | {i.split for i in listing.items} == {"predict"}:  # Kaggle's test.csv alone
        raise DataError(f"{listing.root}: no 'label' column: images without labels are for `convbn predict`, not "
                        "for training (give the train.csv)")
    if len(listing.class_names) < 2:
        raise DataError(f"{listing.root}: {len(listing.class_names)} class ({', '.join(listing.class_names)}); a "
                        "classifier needs at least two")
    if listing.arrays:
        shape = shape or _array_shape(listing.arrays)
        splits = {s: convert_arrays(a, shape, resize) for s, a in listing.arrays.items()}
    else:
        headers, problems = probe(listing.items, workers=1, progress=progress)  # headers: Python's work, no GIL let go
        skipped += problems
        good = [item for item, h in zip(listing.items, headers) if h is not None]
        if not good:
            raise DataError(f"{listing.root}: no readable images ({len(skipped)} files skipped, e.g. "
                            f"{skipped[0][0]}: {skipped[0][1]})" if skipped else f"{listing.root}: no images")
        shape = shape or _file_shape([h for h in headers if h is not None])
        log(f"[data] decoding {len(good)} images of {listing.root} to {'x'.join(map(str, shape))} ({resize})")
        workers = workers or _decode_workers([h for h in headers if h is not None])
        splits = {split: decode_items([i for i in good if i.split == split], shape, resize, workers=workers,
                                      progress=progress)
                  for split in dict.fromkeys(item.split for item in good)}
    for d in splits.values():
        skipped += d.problems
    splits = _split_pool(splits, test_split)
    if "train" not in splits or not len(splits["train"].labels):
        raise DataError(f"{listing.root}: no training images")
    splits["train"] = _take(splits["train"], _stratified_order(splits["train"]))
    mean, std = channel_stats(splits["train"].images)
    return OwnData(listing.root, listing.format, list(listing.class_names), tuple(shape), resize, splits, skipped,
                   "", mean, std, built=True)


def channel_stats(images: np.ndarray) -> tuple:
    """Per-channel mean and std of uint8 images (N, H, W, C), pixels in [0, 1]; a constant channel gets a std of
    1e-3 instead of 0 (it would divide by zero)."""
    if not len(images):
        return [0.0] * images.shape[-1], [1.0] * images.shape[-1]
    x = images.reshape(-1, images.shape[-1])
    mean = x.mean(0, dtype=np.float64) / 255.0
    std = np.sqrt(np.maximum((x.astype(np.float64) ** 2).mean(0) / 255.0**2 - mean**2, 0))
    return [float(m) for m in mean], [float(s) for s in np.maximum(std, 1e-3)]


def _stratified_order(d: Decoded) -> np.ndarray:
    """The training images in an order whose every tail holds each class in its share: within a class, images go
    by their pixel hash (the same on every machine); across classes, by their rank's fraction of the class. So the
    validation images, the last `data.val_split` of them, are a sample of every class (a class of 12 gives 1 at
    10%), and copies of one picture sit side by side, on one side of the cut but for the one straddling it."""
    keys = _pixel_keys(d.hashes)
    place = np.empty(len(keys))
    for c in np.unique(d.labels):
        members = np.flatnonzero(d.labels == c)
        ranked = members[np.argsort(keys[members], kind="stable")]
        place[ranked] = (np.arange(len(ranked)) + 0.5) / len(ranked)
    return np.lexsort((keys, place))


THREADED_PIXELS = 256 * 256  # images this large (median) are decoded on every core, smaller ones on one


def _decode_workers(headers) -> int:
    """Threads to decode with. Pillow lets the GIL go while it decodes, so large pictures decode in parallel
    (150 JPEGs of 1024x768 on 2 cores: 2.10 s on one thread, 1.46 s on two); a small one is mostly Python's work
    per file, which threads only contend for (60,000 MNIST PNGs: 9.4 s on one thread, 15.4 s on two)."""
    pixels = sorted(h.h * h.w for h in headers)
    return (os.cpu_count() or 1) if pixels and pixels[len(pixels) // 2] >= THREADED_PIXELS else 1


def _array_shape(arrays: dict) -> tuple:
    images = next(iter(arrays.values())).images
    return (*_capped(*images.shape[1:3]), 3 if images.ndim == 4 and images.shape[3] in (3, 4) else 1)


def _file_shape(headers) -> tuple:
    """The dataset's own image shape: its most common size (the longer side brought down to
    LARGEST_DEFAULT_SIDE, aspect kept), in colour when any image is."""
    (h, w), _ = Counter((hd.h, hd.w) for hd in headers).most_common(1)[0]
    return (*_capped(h, w), 3 if any(hd.channels == 3 for hd in headers) else 1)


def _capped(h: int, w: int) -> tuple:
    if max(h, w) > LARGEST_DEFAULT_SIDE:
        ratio = LARGEST_DEFAULT_SIDE / max(h, w)
        h, w = max(1, round(h * ratio)), max(1, round(w * ratio))
    return h, w


def _pixel_keys(hashes: np.ndarray) -> np.ndarray:
    """A number in [0, 1) per image from the hash of its pixels (decode.pixel_hash): the same on every machine,
    an added file or CSV row moves no other image between splits, and copies of one picture land together."""
    return np.array([int.from_bytes(bytes(h)[:8].ljust(8, b"\0"), "big") / 2.0**64 for h in hashes])


def _split_pool(splits: dict, test_split: float) -> dict:
    """A dataset given as one pool of labelled images: the images whose pixel keys fall below `test_split` are
    the test set (so exact copies are all on one side), the rest training images (with any the dataset names as
    such). A pool beside a test split of the dataset's own is all training images."""
    pool = splits.pop("pool", None)
    if pool is None:
        return splits
    to_test = _pixel_keys(pool.hashes) < test_split if "test" not in splits else np.zeros(len(pool.labels), bool)
    splits["train"] = _join(splits.get("train"), _take(pool, np.flatnonzero(~to_test)))
    if to_test.any():
        splits["test"] = _take(pool, np.flatnonzero(to_test))
    return splits


def _take(d: Decoded, idx) -> Decoded:
    idx = np.asarray(idx, dtype=np.int64)
    return Decoded(d.images[idx], d.labels[idx], [d.where[i] for i in idx], d.original[idx], d.hashes[idx],
                   problems=[])


def _join(a: Optional[Decoded], b: Decoded) -> Decoded:
    if a is None:
        return b
    return Decoded(np.concatenate([a.images, b.images]), np.concatenate([a.labels, b.labels]),
                   list(a.where) + list(b.where), np.concatenate([a.original, b.original]),
                   np.concatenate([a.hashes, b.hashes]), problems=[])
