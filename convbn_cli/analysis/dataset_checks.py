"""`convbn data check`: the checks of a user's own dataset, as a pure function of what loading it produced (an
OwnData of data/own: per-split decoded images, labels, where each came from, its original size and a hash of its
pixels). Nothing here decodes, reads files or loads TensorFlow; the text and JSON are drawn by
present/dataset_report.py.

Each problem is a DataFinding with a stable snake_case id, a severity, one line and examples (paths as `.where`
names them). Severity: "error" (the dataset is refused: nothing to train on, or skipped files under --strict),
"warning" (likely to mislead or cost accuracy: test images that are copies of training images, conflicting labels,
imbalance, a class too small for one batch), "info" (worth knowing: duplicates within a split, what resizing did).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

SEVERITIES = ("error", "warning", "info")  # the order findings are listed in
SPLIT_ORDER = ("train", "val", "test", "pool", "predict")
UNLABELED = ("predict",)  # rows without labels (a Kaggle test.csv): counted, but not in class or duplicate checks
IMBALANCE = 3.0  # largest/smallest class count above this in a split: named as class_imbalance
EXAMPLES_KEPT = 50  # examples a finding keeps (its count says how many there are in all)
NAMED = 12  # class names a message lists before "..."
CHANNEL_NAMES = {1: "grey", 2: "grey+alpha", 3: "RGB", 4: "RGBA"}


@dataclass
class DataFinding:
    id: str
    severity: str
    message: str
    examples: list = field(default_factory=list)  # up to EXAMPLES_KEPT lines
    count: int = 0  # how many things the examples were drawn from (images, files, classes, sizes)
    evidence: dict = field(default_factory=dict)  # JSON-safe numbers behind the message

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class DataCheck:
    root: str
    format: str
    image_shape: tuple
    resize: str
    content_hash: str
    class_names: list
    sizes: dict  # split -> images (every split, unlabeled ones too)
    counts: dict  # labeled split -> [images per class]
    imbalance: dict  # labeled split -> {"ratio", "largest", "smallest"} (class names), over non-empty classes
    findings: list  # [DataFinding], errors first
    batch_size: int = 128
    strict: bool = False

    @property
    def refused(self) -> bool:
        """Any error: `convbn data check` exits 2 (and `train` refuses the dataset)."""
        return any(f.severity == "error" for f in self.findings)

    def severity_counts(self) -> dict:
        return {s: sum(f.severity == s for f in self.findings) for s in SEVERITIES}


def check_dataset(own, batch_size: int = 128, strict: bool = False) -> DataCheck:
    """Every check of `own` (an OwnData: .splits {split: Decoded}, .class_names, .skipped, .image_shape, .resize,
    .root, .format, .content_hash). `strict`: skipped or unreadable files are an error (the dataset refused)."""
    names = list(own.class_names)
    splits = _ordered(own.splits)
    labeled = [s for s in splits if s not in UNLABELED]
    counts = {s: _class_counts(own.splits[s].labels, len(names)) for s in labeled}
    imbalance = {s: r for s in labeled if (r := _imbalance(counts[s], names)) is not None}
    findings = (_check_skipped(own.skipped or [], strict) + _check_splits(counts, names)
                + check_duplicates({s: own.splits[s] for s in labeled}, names)
                + _check_classes(counts, names, imbalance, batch_size)
                + _check_sizes(own.splits, tuple(own.image_shape), own.resize))
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))  # stable: within a severity, the order above
    return DataCheck(root=str(own.root), format=str(own.format), image_shape=tuple(int(v) for v in own.image_shape),
                     resize=str(own.resize), content_hash=str(getattr(own, "content_hash", "") or ""),
                     class_names=names, sizes={s: int(len(own.splits[s].labels)) for s in splits},
                     counts=counts, imbalance=imbalance, findings=findings, batch_size=int(batch_size),
                     strict=bool(strict))


def _ordered(splits: dict) -> list:
    return [s for s in SPLIT_ORDER if s in splits] + sorted(s for s in splits if s not in SPLIT_ORDER)


def _class_counts(labels, k: int) -> list:
    labels = np.asarray(labels, dtype=np.int64)
    labels = labels[(labels >= 0) & (labels < k)]
    return [int(n) for n in np.bincount(labels, minlength=k)[:k]]


def _imbalance(counts: list, names: list):
    present = [(n, c) for c, n in enumerate(counts) if n > 0]
    if len(present) < 2:
        return None
    (most, big), (least, small) = max(present), min(present)
    return {"ratio": most / least, "largest": names[big], "largest_images": most,
            "smallest": names[small], "smallest_images": least}


# --------------------------------------------------------------------------- files that could not be used

def _check_skipped(skipped, strict: bool) -> list:
    """Files listing, probing or decoding gave up on: named with their paths and counted per reason, never
    silently dropped; under --strict they refuse the dataset."""
    skipped = [(str(w), str(why)) for w, why in skipped]
    if not skipped:
        return []
    reasons = Counter(why for _, why in skipped)
    top = "; ".join(f"{n} {why}" for why, n in reasons.most_common(3)) + ("; ..." if len(reasons) > 3 else "")
    if strict:
        return [DataFinding("unreadable_files", "error",
                            f"refused (--strict): {len(skipped)} file(s) could not be used ({top})",
                            _examples(f"{w}: {why}" for w, why in skipped), len(skipped), {"reasons": dict(reasons)})]
    return [DataFinding("unreadable_files", "warning",
                        f"{len(skipped)} file(s) could not be used and were skipped ({top}); --strict refuses them",
                        _examples(f"{w}: {why}" for w, why in skipped), len(skipped), {"reasons": dict(reasons)})]


def _few(names: list) -> str:
    """The first NAMED of a list of names, on one line."""
    return ", ".join(names[:NAMED]) + (", ..." if len(names) > NAMED else "")


def _examples(lines) -> list:
    out = []
    for line in lines:
        if len(out) == EXAMPLES_KEPT:
            break
        out.append(line)
    return out


# --------------------------------------------------------------------------- splits and classes

def _check_splits(counts: dict, names: list) -> list:
    """No training images (nothing to train on: an error); no test images (nothing to measure accuracy on); a
    val or test class the training split lacks (every image of it will be wrong)."""
    out = []
    if sum(counts.get("train", [])) == 0:
        out.append(DataFinding("no_training_images", "error", "the training split has no images: nothing to train on"))
    if sum(counts.get("test", [])) == 0:
        out.append(DataFinding("test_split_empty", "warning",
                               "the test split has no images: eval and the run's test accuracy have nothing to measure "
                               "(add test images, or let data.test_split set some training images aside)"))
    train = counts.get("train", [0] * len(names))
    missing = [(s, c) for s in ("val", "test") if s in counts for c, n in enumerate(counts[s]) if n and not train[c]]
    if missing and sum(train):
        classes = sorted({names[c] for _, c in missing})
        out.append(DataFinding(
            "class_missing_from_train", "warning",
            f"{len(classes)} class(es) have val/test images but none in the training split, so the model never "
            f"learns them and every such image counts as wrong: {_few(classes)}",
            _examples(f"{names[c]}: {counts[s][c]:,} {s} image(s), 0 in train" for s, c in missing), len(missing),
            {"classes": classes}))
    return out


def _check_classes(counts: dict, names: list, imbalance: dict, batch_size: int) -> list:
    """Class imbalance (largest/smallest above IMBALANCE in a split) and training classes smaller than a batch."""
    out = []
    lopsided = {s: r for s, r in imbalance.items() if r["ratio"] > IMBALANCE}
    if lopsided:
        worst = max(lopsided, key=lambda s: lopsided[s]["ratio"])
        r = lopsided[worst]
        out.append(DataFinding(
            "class_imbalance", "warning",
            f"classes are imbalanced (largest/smallest above {IMBALANCE:g}x): {worst} {r['ratio']:.1f}x, "
            f"'{r['largest']}' {r['largest_images']:,} vs '{r['smallest']}' {r['smallest_images']:,} images; "
            "accuracy alone will hide the small classes (eval's per-class accuracy shows them)",
            [f"{s}: {r['ratio']:.1f}x, largest '{r['largest']}' ({r['largest_images']:,}), smallest "
             f"'{r['smallest']}' ({r['smallest_images']:,})" for s, r in lopsided.items()], len(lopsided),
            {"threshold": IMBALANCE, "ratios": {s: float(r["ratio"]) for s, r in lopsided.items()}}))
    train = counts.get("train", [])
    empty = [c for c in range(len(names)) if not any(n[c] for n in counts.values() if len(n) > c)]
    if empty:  # labels 1..K (EMNIST letters) leave a class 0 with nothing: a logit the model learns never to give
        out.append(DataFinding(
            "empty_class", "warning",
            f"{len(empty)} class(es) have no image in any split: {_few([repr(names[c]) for c in empty])} (labels "
            "that skip numbers, e.g. 1..K instead of 0..K-1, leave such classes)",
            _examples(f"{names[c]!r}: no images" for c in empty), len(empty), {"classes": [names[c] for c in empty]}))
    small = [c for c, n in enumerate(train) if 0 < n < batch_size]
    if small:
        shown = _few([f"'{names[c]}'" for c in small])
        out.append(DataFinding(
            "class_smaller_than_batch", "warning",
            f"{len(small)} class(es) have fewer training images than one batch ({batch_size}): {shown}; they are seen "
            "a few times an epoch and easily overfitted",
            _examples(f"'{names[c]}': {train[c]:,} training image(s)" for c in small), len(small),
            {"batch_size": int(batch_size), "classes": {names[c]: int(train[c]) for c in small}}))
    return out


# --------------------------------------------------------------------------- exact duplicates

@dataclass
class _Pool:
    """Every labeled image of every split, concatenated: its pixel hash, split index, label and index in its split."""

    splits: list
    decoded: list
    hashes: np.ndarray
    split: np.ndarray
    labels: np.ndarray
    index: np.ndarray

    @classmethod
    def of(cls, splits: dict) -> _Pool:
        names = list(splits)
        decoded = [splits[s] for s in names]
        sizes = [len(d.labels) for d in decoded]
        return cls(names, decoded,
                   np.concatenate([np.asarray(d.hashes) for d in decoded]) if decoded else np.zeros(0, "S16"),
                   np.repeat(np.arange(len(names)), sizes),
                   np.concatenate([np.asarray(d.labels, np.int64) for d in decoded]) if decoded else np.zeros(0, int),
                   np.concatenate([np.arange(n) for n in sizes]) if decoded else np.zeros(0, int))

    def name(self, i: int, names: list) -> str:
        """How an example names an image: its `where`, with its split where the path does not say it already
        (a pooled folder split by a seed), and its class."""
        s, where = self.splits[self.split[i]], str(self.decoded[self.split[i]].where[self.index[i]])
        label = int(self.labels[i])
        cls = f" [{names[label]}]" if 0 <= label < len(names) else ""
        return (where if where.split("/", 1)[0] == s else f"{where} ({s})") + cls


@dataclass
class _Dups:
    """The images whose hash another image shares: their pool index (`dup`), group (0..G-1, one per hash), the
    splits each group spans (`member`, G x splits), and each group's members on demand."""

    pool: _Pool
    dup: np.ndarray
    group: np.ndarray
    member: np.ndarray
    order: np.ndarray
    bounds: np.ndarray

    def members(self, g: int) -> np.ndarray:
        return self.dup[self.order[self.bounds[g]:self.bounds[g + 1]]]

    def line(self, images, names: list) -> str:
        return " = ".join(self.pool.name(i, names) for i in images[:4]) + (" = ..." if len(images) > 4 else "")


def check_duplicates(splits: dict, names: list) -> list:
    """Exact duplicates (same pixel hash) within a split (info: those images weigh more), across splits (a
    warning: val/test images the model trained on inflate their accuracy) and with different labels (a warning).
    Vectorised: one np.unique over the hashes, then work on the duplicated images only, and Python loops only
    over the examples kept."""
    pool = _Pool.of(splits)
    if len(pool.hashes) == 0:
        return []
    _, inverse, counts = np.unique(pool.hashes, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    dup = np.flatnonzero(counts[inverse] > 1)
    if len(dup) == 0:
        return []
    _, group = np.unique(inverse[dup], return_inverse=True)
    group = group.reshape(-1)
    size = int(group.max()) + 1
    order = np.argsort(group, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(group, minlength=size))])
    member = np.zeros((size, len(pool.splits)), bool)
    member[group, pool.split[dup]] = True
    d = _Dups(pool, dup, group, member, order, bounds)
    return _within(d, names) + _across(d, names) + _conflicting(d, names)


def _within(d: _Dups, names: list) -> list:
    pool, splits = d.pool, len(d.pool.splits)
    keys, n = np.unique(d.group * splits + pool.split[d.dup], return_counts=True)
    extra = np.bincount(keys % splits, weights=n - 1, minlength=splits).astype(int)
    if not extra.any():
        return []
    per_split = {s: int(e) for s, e in zip(pool.splits, extra) if e}
    lines = []
    for key in keys[n > 1][:EXAMPLES_KEPT]:
        images = d.members(key // splits)
        lines.append(d.line(images[pool.split[images] == key % splits], names))
    total = int(extra.sum())
    return [DataFinding(
        "duplicates_within_split", "info",
        f"{total:,} image(s) are exact copies of another image of the same split ("
        + ", ".join(f"{s} {n:,}" for s, n in per_split.items()) + "): they count more than once in training "
        "and in accuracy", lines, total, {"extra_copies": per_split})]


def _across(d: _Dups, names: list) -> list:
    """For each pair of splits (train-val, train-test, val-test): the images of the later split that have a copy
    in the earlier one."""
    pool, pairs = d.pool, {}
    for a in range(len(pool.splits)):
        for b in range(a + 1, len(pool.splits)):
            hit = np.count_nonzero((pool.split[d.dup] == b) & d.member[d.group, a])
            if hit:
                pairs[f"{pool.splits[b]} in {pool.splits[a]}"] = (a, b, int(hit), len(pool.decoded[b].labels))
    if not pairs:
        return []
    spanning = np.flatnonzero(d.member.sum(1) > 1)
    lines = [d.line(d.members(g), names) for g in spanning[:EXAMPLES_KEPT]]
    said = "; ".join(f"{n:,} {pool.splits[b]} image(s) ({n / size:.1%} of {pool.splits[b]}) also in "
                     f"{pool.splits[a]}" for a, b, n, size in pairs.values())
    total = sum(n for _, _, n, _ in pairs.values())
    return [DataFinding(
        "duplicates_across_splits", "warning",
        f"exact copies across splits: {said}; the model trains on them, so they inflate the accuracy measured "
        "on those splits (remove them from one side)", lines, total,
        {"images": {k: n for k, (_, _, n, _) in pairs.items()},
         "fraction": {k: n / size for k, (_, _, n, size) in pairs.items()}})]


def _conflicting(d: _Dups, names: list) -> list:
    labels, size = d.pool.labels[d.dup], len(d.bounds) - 1
    low = np.full(size, np.iinfo(np.int64).max)
    high = np.full(size, np.iinfo(np.int64).min)
    np.minimum.at(low, d.group, labels)
    np.maximum.at(high, d.group, labels)
    bad = np.flatnonzero(low != high)
    if not len(bad):
        return []
    images = int(np.diff(d.bounds)[bad].sum())
    return [DataFinding(
        "conflicting_labels", "warning",
        f"{len(bad):,} set(s) of identical images carry different labels ({images:,} images): at most one label "
        "can be right, and the model is trained (or scored) against the other",
        [d.line(d.members(g), names) for g in bad[:EXAMPLES_KEPT]], int(len(bad)),
        {"groups": int(len(bad)), "images": images})]


# --------------------------------------------------------------------------- sizes and channels

def _check_sizes(splits: dict, shape: tuple, rule: str) -> list:
    """The original sizes and channel counts found, with counts, and what the resize rule did to each."""
    original = [np.asarray(d.original, np.int64).reshape(-1, 3) for d in splits.values()]
    original = np.concatenate(original) if original else np.zeros((0, 3), np.int64)
    if len(original) == 0:
        return []
    out = []
    sizes, n = np.unique(original[:, :2], axis=0, return_counts=True)
    order = np.argsort(-n, kind="stable")
    lines = [f"{int(n[i]):,} image(s) of {h}x{w}: {describe_resize(int(h), int(w), shape, rule)}"
             for i in order for h, w in [sizes[i]]]
    up = int(sum(n[i] for i, (h, w) in enumerate(sizes) if _scale(h, w, shape, rule) > 1))
    down = int(sum(n[i] for i, (h, w) in enumerate(sizes) if _scale(h, w, shape, rule) < 1))
    evidence = {"sizes": {f"{h}x{w}": int(c) for (h, w), c in zip(sizes.tolist(), n)}, "upscaled": up,
                "downscaled": down, "target": f"{shape[0]}x{shape[1]}", "rule": rule}
    target = f"{shape[0]}x{shape[1]}"
    if len(sizes) > 1:
        out.append(DataFinding(
            "mixed_sizes", "info",
            f"images come in {len(sizes)} sizes (height x width); resize rule '{rule}' brought them to {target} "
            f"({up:,} scaled up, {down:,} scaled down)", _examples(lines), len(sizes), evidence))
    elif tuple(sizes[0]) != tuple(shape[:2]):
        out.append(DataFinding("resized", "info", f"every image is {sizes[0][0]}x{sizes[0][1]}, resized to {target}: "
                               + describe_resize(int(sizes[0][0]), int(sizes[0][1]), shape, rule), lines, 1, evidence))
    return out + _check_channels(original[:, 2], shape)


def _check_channels(channels: np.ndarray, shape: tuple) -> list:
    kinds, n = np.unique(channels, return_counts=True)
    target = int(shape[2]) if len(shape) > 2 else 1
    lines = [f"{c:,} image(s) {_channels(k)} ({_channel_count(k)})"
             + (f": converted to {_channels(target)}" if k != target else ": kept") for k, c in zip(kinds, n)]
    evidence = {"channels": {str(int(k)): int(c) for k, c in zip(kinds, n)}, "target": target}
    if len(kinds) > 1:
        return [DataFinding(
            "mixed_channels", "warning",
            f"images have {len(kinds)} different channel counts ("
            + ", ".join(f"{c:,} {_channels(k)}" for k, c in zip(kinds, n))
            + f"), all converted to {_channels(target)}: a mix of grey and colour often means stray files",
            lines, len(kinds), evidence)]
    if int(kinds[0]) != target:
        return [DataFinding("channels_converted", "info",
                            f"every image is {_channels(kinds[0])}, converted to {_channels(target)}", lines, 1,
                            evidence)]
    return []


def _channels(c) -> str:
    return CHANNEL_NAMES.get(int(c), f"{int(c)} channels")


def _channel_count(c) -> str:
    return "1 channel" if int(c) == 1 else f"{int(c)} channels"


def _scale(h: int, w: int, shape: tuple, rule: str) -> float:
    """The factor the rule scales an image by (for stretch, its area's square root)."""
    sy, sx = shape[0] / h, shape[1] / w
    if rule == "pad":
        return min(sy, sx)
    if rule == "fit":
        return max(sy, sx)
    return float(np.sqrt(sy * sx))


def describe_resize(h: int, w: int, shape: tuple, rule: str) -> str:
    """What the resize rule does to an h x w image: "scaled down x0.44, padded to 28x28 (aspect kept)"."""
    H, W = int(shape[0]), int(shape[1])
    target = f"{H}x{W}"
    if (h, w) == (H, W):
        return "kept as it is"
    sy, sx = H / h, W / w
    s = _scale(h, w, shape, rule)
    scaled = f"scaled up x{s:.3g}" if s > 1 else f"scaled down x{s:.3g}" if s < 1 else "not scaled"
    if rule == "stretch":
        if abs(sy - sx) < 1e-9:
            return f"{scaled} to {target}"
        return f"stretched to {target} (x{sy:.3g} in height, x{sx:.3g} in width: aspect changed)"
    if rule not in ("pad", "fit"):
        return f"resized to {target} by rule '{rule}'"
    exact = round(h * s) == H and round(w * s) == W
    step = "padded" if rule == "pad" else "cropped at the centre"
    return scaled + (f" to {target}" if exact else f", {step} to {target} (aspect kept)")
