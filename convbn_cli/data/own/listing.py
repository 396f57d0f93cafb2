"""What a dataset the user brings holds, found without decoding a pixel: which images, in which split, with which
label. The layouts (`fmt`; "auto" tells them by what the path is and holds):
- folder: PATH/<class>/<image>, or PATH/train/<class>/... + PATH/test/<class>/... [+ PATH/val/...]; class names
  are the sorted folder names (their union over the splits); hidden files and folders are not looked at;
- csv: Kaggle's label,pixel0..pixelK (K+1 a square; its test.csv without labels is split "predict"), or rows of
  path,label with paths relative to the CSV's folder;
- npz: x_train, y_train [, x_test, y_test] [, x_val, y_val] [, class_names], or x, y as `diagnose --data` reads;
- idx: *train-images-idx3-ubyte[.gz] + *train-labels-idx1-ubyte[.gz] and the t10k-/test- pair (EMNIST, KMNIST).
Training images without a labelled test split beside them are the "pool", which the caller splits. Bounded like
every read of convbn's: at most `max_files` images (data.max_files), each CSV at most 1 GiB, 10M rows and short
cells, an array by its header before it is loaded; a FIFO, socket or device is refused from its lstat (never
opened, so nothing blocks), and a symbolic link leading out of the dataset is refused, naming the link. Every
refusal is one DataError line naming the file (and the CSV line).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ...errors import DataError
from ...readers import check_size, check_zip, open_regular, size_text
from ..external import load_npz_arrays
from ..formats import read_idx
from .decode import array_pixels, check_array_header

SPLITS = ("train", "val", "test", "pool", "predict")  # pool: split by data.test_split; predict: no labels
FORMATS = ("folder", "csv", "npz", "idx")
SPLIT_FOLDERS = ("train", "val", "test")
IMAGE_SUFFIXES = frozenset(".png .jpg .jpeg .bmp .gif .tif .tiff .webp .pgm .ppm .pbm .pnm".split())
IGNORED = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})  # what operating systems leave beside pictures
MAX_CLASSES = 10_000  # as many class names as a run's config may record (config.schema.DatasetFacts)
MAX_CSV_BYTES = 1 << 30
MAX_CSV_ROWS = 10_000_000
MAX_CELL_CHARS = 64  # a pixel value, a label, a class name
MAX_PATH_CHARS = 4096  # a path cell (PATH_MAX): the csv module's field size limit while a CSV is read
MAX_LINE_CHARS = 1 << 22  # one CSV line: a 512x512 Kaggle-layout row fits (its header is 3.2 MB)
MAX_PIXEL_COLUMNS = 512 * 512
MAX_ARRAY_BYTES = 1 << 30  # one array of an .npz, by its header, before it is loaded
IDX_NAME = re.compile(r"(?P<prefix>.*?)(?P<split>train|t10k|test)-(?P<kind>images|labels)[-.]idx(?P<dims>[13])"
                      r"-ubyte(?:\.gz)?", re.IGNORECASE)


@dataclass(frozen=True)
class Item:
    """One image file to decode."""

    path: Path  # absolute; lies inside the dataset root (symlinks resolved and checked)
    where: str  # what messages name: path relative to the root, or "labels.csv:17"
    split: str  # one of SPLITS
    label: int  # index into Listing.class_names; -1 for no label
    stat_key: tuple  # (st_size, st_mtime_ns, st_ctime_ns, st_ino, st_dev) of the file


@dataclass
class ArraySplit:
    """Images that came as arrays (NPZ, IDX, Kaggle CSV)."""

    images: np.ndarray  # uint8 (N, h, w) or (N, h, w, c), c in (1, 3, 4)
    labels: np.ndarray  # int64 (N,), -1 where unlabeled
    where: str  # "data.npz[x_train]", "train.csv", "emnist-train-images-idx3-ubyte.gz"
    rows: Optional[list] = None  # per image, what messages name ("train.csv:17"); None: f"{where}[{i}]"


@dataclass
class Listing:
    root: Path  # the dataset path as given, resolved
    format: str  # folder | csv | npz | idx (what auto resolved to)
    class_names: list[str]
    items: list[Item]  # file sources (folder, csv of path,label); [] for array sources
    arrays: dict  # split -> ArraySplit for array sources; {} for file sources
    skipped: list[tuple[str, str]]  # (where, why) passed over: a .txt in a class folder, a CSV row's missing file
    files: list[Path]  # every file whose bytes the cache's content hash must cover, sorted


def list_dataset(path, fmt: str = "auto", max_files: int = 200_000) -> Listing:
    """The images of the dataset at `path` in the layout `fmt` (auto, folder, csv, npz or idx)."""
    try:
        scan = _Scan(Path(path), max_files)
        fmt = _detect(scan) if fmt == "auto" else fmt
        if fmt not in FORMATS:
            raise DataError(f"{path}: unknown dataset format {fmt!r}; expected auto, {', '.join(FORMATS)}")
        return {"folder": _list_folder, "csv": _list_csv, "npz": _list_npz, "idx": _list_idx}[fmt](scan)
    except DataError as e:  # a file name or a CSV cell quoted in it may hold a line break: still one line
        raise DataError(" ".join(str(e).splitlines())) from None


# --------------------------------------------------------------------------- walking the dataset, bounded

def _kind(mode) -> str:
    return ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")


def _inside(target, folder) -> bool:
    return os.path.commonpath([str(folder), str(target)]) == str(folder)


def _stat_key(st) -> tuple:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev


class _Scan:
    """One listing's root, the bounds it counts (images, other entries) and what it passed over."""

    def __init__(self, given: Path, max_files: int):
        self.given, self.max_files = given, max_files
        try:
            self.root = given.resolve(strict=True)
            st = os.stat(self.root)
        except FileNotFoundError:
            raise DataError(f"{given}: no such file or folder") from None
        except (OSError, RuntimeError) as e:  # RuntimeError: a loop of symbolic links
            raise DataError(f"{given}: cannot read: {getattr(e, 'strerror', None) or e}") from None
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise DataError(f"{given}: is {_kind(st.st_mode)}, not a file or folder; refused")
        self.folder = self.root if stat.S_ISDIR(st.st_mode) else self.root.parent  # what links must stay inside
        self.images = self.entries = 0
        self.skipped, self.seen, self.links = [], {}, {}  # links: path -> where it leads (inside the dataset)

    def name(self, path) -> str:  # what messages name: below the dataset path as the user gave it
        if not _inside(path, self.folder):
            return str(path)
        base = self.given if self.folder == self.root else self.given.parent
        return str(base / Path(path).relative_to(self.folder))

    def where(self, path) -> str:  # what Item.where and `skipped` name: relative to the dataset's folder
        return str(path)[len(str(self.folder).rstrip("/")) + 1:]

    def skip(self, where: str, why: str) -> None:
        self.skipped.append((where, why))
        self.count_entry()

    def count_entry(self) -> None:
        self.entries += 1
        if self.entries > 2 * self.max_files + 1000:
            raise DataError(f"{self.given}: more than {self.entries - 1:,} files and folders that are not images "
                            f"(data.max_files, {self.max_files:,} images, bounds them to twice as many)")

    def count_image(self, n: int = 1) -> None:
        self.images += n
        if self.images > self.max_files:
            raise DataError(f"{self.given}: more than {self.max_files:,} images (data.max_files); raise it to use more")

    def kind(self, path: Path):
        """("file" | "dir" | None, stat of what it leads to) for an entry met while listing; None: passed over,
        and said so in `skipped`. Nothing is opened: a FIFO is refused from its lstat."""
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(path)
                if not _inside(target, self.folder):
                    raise DataError(f"{self.name(path)}: a symbolic link to {target}, outside {self.given}; refused")
                if not os.path.exists(target):
                    return self.skip(self.where(path), "a broken symbolic link"), None
                st, self.links[path] = os.stat(target), Path(target)
                if stat.S_ISDIR(st.st_mode):  # never followed: a link to a folder above it would loop forever
                    return self.skip(self.where(path), "a symbolic link to a folder (not followed)"), None
        except OSError as e:
            raise DataError(f"{self.name(path)}: cannot read: {e.strerror or e}") from None
        if stat.S_ISDIR(st.st_mode):
            return "dir", st
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{self.name(path)}: is {_kind(st.st_mode)}, not a file; refused")
        return "file", st

    def children(self, folder: Path, want=None) -> list:
        """[(path, "file" | "dir", stat)] of a folder's visible entries (only the names `want` accepts, if given),
        sorted by name; each folder is read once."""
        if (folder, want) in self.seen:
            return self.seen[folder, want]
        names = []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    self.count_entry()
                    if not (entry.name.startswith(".") or entry.name in IGNORED or (want and not want(entry.name))):
                        names.append(entry.name)
        except OSError as e:
            raise DataError(f"{self.name(folder)}: cannot read: {e.strerror or e}") from None
        out = []
        for name in sorted(names):
            kind, st = self.kind(folder / name)
            if kind is not None:
                out.append((folder / name, kind, st))
        self.seen[folder, want] = out
        return out


def _detect(scan: _Scan) -> str:
    """The format "auto" stands for: a file by its name, a folder by what it holds."""
    if scan.root.is_file():
        found = {".csv": "csv", ".npz": "npz"}.get(scan.root.suffix.lower())
        found = found or ("idx" if IDX_NAME.fullmatch(scan.root.name) else None)
        if found is None:
            raise DataError(f"{scan.given}: not a folder, .csv, .npz or IDX file; set data.dataset.format")
        return found
    entries = scan.children(scan.root)
    if any(kind == "file" and IDX_NAME.fullmatch(p.name) for p, kind, _ in entries):
        return "idx"
    tables = [p.name for p, kind, _ in entries if kind == "file" and p.suffix.lower() in (".csv", ".npz")]
    if tables and any(kind == "dir" for _, kind, _ in entries):  # class folders, or the images a CSV names?
        raise DataError(f"{scan.given}: holds folders and {', '.join(tables[:3])}; set data.dataset.format (folder, "
                        "csv or npz) or name the file")
    suffixes = {name[-4:].lower() for name in tables}
    return "npz" if ".npz" in suffixes else "csv" if ".csv" in suffixes else "folder"  # folder: says what is amiss


# --------------------------------------------------------------------------- image folders

def _list_folder(scan: _Scan) -> Listing:
    if not scan.root.is_dir():
        raise DataError(f"{scan.given}: not a folder (the folder layout is {scan.given}/<class>/<image>)")
    top = scan.children(scan.root)
    names = {p.name for p, kind, _ in top if kind == "dir"}
    if "train" in names:
        others = sorted(names - set(SPLIT_FOLDERS))
        if others:
            raise DataError(f"{scan.given}: holds train/ beside other folders ({', '.join(others[:5])}); use either "
                            f"{scan.given}/<class>/ or {scan.given}/train/<class>/ + {scan.given}/test/<class>/")
        for p, kind, _ in top:
            if kind == "file":
                scan.skip(scan.where(p), "not in a split folder (train/, val/, test/)")
        splits = {("pool" if name == "train" and "test" not in names else name): scan.root / name
                  for name in SPLIT_FOLDERS if name in names}
    else:
        splits = {"pool": scan.root}
    found = {split: _class_folders(scan, folder) for split, folder in splits.items()}
    _check_classes(scan, splits, found)
    class_names = sorted({c for classes in found.values() for c in classes})
    if len(class_names) > MAX_CLASSES:
        raise DataError(f"{scan.given}: {len(class_names):,} class folders, more than {MAX_CLASSES:,}")
    index = {c: i for i, c in enumerate(class_names)}
    items = [Item(scan.links.get(p, p), scan.where(p), split, index[c], _stat_key(st))
             for split in SPLITS if split in found for c, files in sorted(found[split].items()) for p, st in files]
    return Listing(scan.root, "folder", class_names, items, {}, scan.skipped, sorted({it.path for it in items}))


def _class_folders(scan: _Scan, folder: Path) -> dict:
    """{class name: [(path, stat)] of its images, sorted} for the class folders in `folder`."""
    classes = {}
    for p, kind, _ in scan.children(folder):
        if kind == "dir":
            classes[p.name] = _images_below(scan, p)
        else:
            scan.skip(scan.where(p), "not in a class folder")
    return classes


def _images_below(scan: _Scan, folder: Path) -> list:
    found, todo = [], [folder]
    while todo:
        for p, kind, st in scan.children(todo.pop()):
            if kind == "dir":
                todo.append(p)
            elif p.suffix.lower() in IMAGE_SUFFIXES:
                scan.count_image()
                found.append((p, st))
            else:
                scan.skip(scan.where(p), f"not an image ({p.suffix or 'no extension'})")
    return sorted(found, key=lambda f: str(f[0]))


def _check_classes(scan: _Scan, splits: dict, found: dict) -> None:
    """No images at all, a split folder without class folders and an empty class folder are errors."""
    if scan.images == 0:
        others = f" ({len(scan.skipped)} other files, e.g. {scan.skipped[0][0]})" if scan.skipped else ""
        raise DataError(f"no images under {scan.given} in class folders{others}; the layout is "
                        f"{scan.given}/<class>/<image>")
    for split, classes in found.items():
        if not classes:
            raise DataError(f"{scan.name(splits[split])}: no class folders (the layout is <folder>/<class>/<image>)")
        for c in (c for c, files in sorted(classes.items()) if not files):
            raise DataError(f"{scan.name(splits[split] / c)}: an empty class folder (no images); add some or remove it")


# --------------------------------------------------------------------------- labels

def _int(text: str):
    return int(text) if re.fullmatch(r"[+-]?\d{1,18}", text) else None


def _labels(raw: list, names_ok: bool):
    """(class names, label per row) from [(where, text)]: integers >= 0 (classes "0".."max"), or, if most labels
    are not integers and `names_ok`, class names (sorted)."""
    if not raw:
        return [], []
    texts = [t.strip() for _, t in raw]
    ints = [_int(t) for t in texts]
    if not names_ok or 2 * sum(i is not None for i in ints) >= len(ints):
        for (where, text), i in zip(raw, ints):
            if i is None:
                raise DataError(f"{where}: label {text[:MAX_CELL_CHARS]!r} is neither an integer nor a class name")
            if not 0 <= i < MAX_CLASSES:
                raise DataError(f"{where}: label {i} is not a class number 0..{MAX_CLASSES - 1} (nor a class name)")
        return [str(k) for k in range(max(ints) + 1)], ints
    for (where, _), text in zip(raw, texts):
        if not text or len(text) > MAX_CELL_CHARS:
            raise DataError(f"{where}: label {text[:MAX_CELL_CHARS]!r} is not a class name (1 to {MAX_CELL_CHARS} "
                            "characters)")
    names = sorted(set(texts))
    if len(names) > MAX_CLASSES:
        raise DataError(f"{raw[0][0].split(':')[0]}: {len(names):,} class names, more than {MAX_CLASSES:,}")
    index = {n: i for i, n in enumerate(names)}
    return names, [index[t] for t in texts]


def _label_array(y, where: str, class_names) -> np.ndarray:
    """Integer labels of an array source: a 1-D array of class numbers >= 0 (below len(class_names) if given)."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be a 1-D array of integers, got shape {y.shape} of {y.dtype}")
    top = len(class_names) if class_names else MAX_CLASSES
    if y.size and (int(y.min()) < 0 or int(y.max()) >= top):
        raise DataError(f"{where}: labels run from {y.min()} to {y.max()}; expected class numbers 0..{top - 1}")
    return y.astype(np.int64)


def _number_names(labels) -> list:
    return [str(k) for k in range(max((int(y.max()) + 1 for y in labels if y.size), default=0))]


# --------------------------------------------------------------------------- CSV

def _csv_rows(path: Path, name: str):
    """(line number, cells) of each non-blank row of a CSV, bounded: the file's size, the rows, each line's
    length and each cell's (the csv module's field size limit)."""
    old = csv.field_size_limit(MAX_PATH_CHARS)  # process-wide: set back when this file is read
    try:
        with open_regular(path, DataError) as raw:
            check_size(name, raw, MAX_CSV_BYTES, "a CSV file", DataError)
            reader = csv.reader(_lines(io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""), name))
            try:
                for cells in reader:
                    if reader.line_num > MAX_CSV_ROWS:
                        raise DataError(f"{name}: more than {MAX_CSV_ROWS:,} lines; refused")
                    if cells:
                        yield reader.line_num, cells
            except csv.Error as e:
                raise DataError(f"{name}: line {reader.line_num}: not valid CSV ({e})") from None
            except UnicodeDecodeError:
                raise DataError(f"{name}: line {reader.line_num + 1}: not UTF-8 text") from None
    finally:
        csv.field_size_limit(old)


def _lines(text, name: str):
    n = 0
    while line := text.readline(MAX_LINE_CHARS + 1):
        n += 1
        if len(line) > MAX_LINE_CHARS:
            raise DataError(f"{name}: line {n}: longer than {size_text(MAX_LINE_CHARS)}; refused")
        yield line


def _csv_files(scan: _Scan) -> list:
    """[(path, role)] of the CSV files of the dataset, role "main", "test" or "val": a CSV given by its path is
    the main one, with the test (and val) file whose name has "test" ("val") for its "train"; in a folder, its
    one CSV, or those named *train*, *test*, *val* (others, such as sample_submission.csv, are passed over)."""
    if scan.root.is_file():
        twins = [(scan.folder / re.sub("train", role, scan.root.name, flags=re.IGNORECASE), role)
                 for role in ("test", "val") if "train" in scan.root.name.lower()]
        return [(scan.root, "main")] + [(p, role) for p, role in twins if p.exists() and scan.kind(p)[0] == "file"]
    files = [p for p, kind, _ in scan.children(scan.root) if kind == "file" and p.suffix.lower() == ".csv"]
    if len(files) == 1:
        return [(files[0], "main")]
    roles = [(p, next((r for r, w in (("main", "train"), ("test", "test"), ("val", "val")) if w in p.name.lower()),
                      None)) for p in files]
    found = [(p, role) for p, role in roles if role or scan.skip(scan.where(p), "a CSV not named train, test or val")]
    mains = [p.name for p, role in found if role == "main"]
    if len(mains) != 1:
        raise DataError(f"{scan.given}: {'no CSV' if not mains else 'several CSVs'} named *train*.csv "
                        f"({', '.join(p.name for p in files) or 'no CSV at all'}); name the one to read")
    return found


def _list_csv(scan: _Scan) -> Listing:
    csv_files = _csv_files(scan)
    tables = [(role, _read_table(scan, path, role)) for path, role in csv_files]
    layouts = {"images" in t for _, t in tables}
    if len(layouts) > 1:
        raise DataError(f"{scan.given}: a path,label CSV beside a label,pixel0,... CSV; use one layout")
    pixels = layouts.pop()
    labelled_test = any(role == "test" and t["label"] is not None for role, t in tables)
    class_names, labels = _labels([r for _, t in tables for r in t["label"] or []], names_ok=not pixels)
    labels, splits = iter(labels), {}
    for role, t in tables:
        split = {"main": "train" if labelled_test else "pool", "val": "val"}.get(role, "test") \
            if t["label"] is not None else "predict"
        splits[split] = (t, np.array([next(labels) if t["label"] is not None else -1 for _ in t["rows"]], np.int64))
    files = sorted(path for path, _ in csv_files)
    if pixels:  # Kaggle's layout: the pixels are in the CSVs
        arrays = {split: ArraySplit(t["images"], y, t["name"], t["rows"]) for split, (t, y) in splits.items()}
        return Listing(scan.root, "csv", class_names, [], arrays, scan.skipped, files)
    items = [Item(p, where, split, int(label), key)
             for split in SPLITS if split in splits
             for (p, where, key), label in zip(splits[split][0]["rows"], splits[split][1])]
    return Listing(scan.root, "csv", class_names, items, {}, scan.skipped, sorted(set(files) | {i.path for i in items}))


def _read_table(scan: _Scan, path: Path, role: str) -> dict:
    """One CSV read whole, in either layout: {"rows", "label": [(where, text)] or None[, "images", "name"]}."""
    name = scan.name(path)
    rows = _csv_rows(path, name)
    try:
        header = [h.strip() for h in next(rows, (1, []))[1]]
        if not header:
            raise DataError(f"{name}: an empty CSV (expected a header: label,pixel0,... or path,label)")
        pixels = any(h.startswith("pixel") for h in header)
        table = (_pixel_table if pixels else _path_table)(scan, path, name, header, rows)
    finally:
        rows.close()  # sets the csv module's field size limit back at once, whatever happened
    if table["label"] is None and (role != "test" and "images" not in table):  # Kaggle's test.csv: for predict
        raise DataError(f"{name}: line 1: no 'label' column (the header is: {', '.join(header)[:200]})")
    return table


def _pixel_table(scan: _Scan, path: Path, name: str, header: list, rows) -> dict:
    """Kaggle's layout: a label column (or none, in a test file) and pixel0..pixelK, K+1 a square number."""
    label_col = header.index("label") if "label" in header else None
    pixel_cols = [i for i, h in enumerate(header) if i != label_col]
    side = math.isqrt(len(pixel_cols))
    for k, i in enumerate(pixel_cols):
        if header[i] != f"pixel{k}":
            raise DataError(f"{name}: line 1: no column 'pixel{k}' (column {i + 1} is {header[i][:64]!r}); expected "
                            "label,pixel0,pixel1,... in order")
    if side * side != len(pixel_cols) or len(pixel_cols) > MAX_PIXEL_COLUMNS:
        raise DataError(f"{name}: line 1: {len(pixel_cols)} pixel columns, not the pixels of a square image (at most "
                        f"{MAX_PIXEL_COLUMNS:,})")
    images, labels, where = [], [], []
    for line, cells in rows:
        if len(cells) != len(header):
            raise DataError(f"{name}: line {line}: {len(cells)} cells, the header has {len(header)}")
        scan.count_image()
        values = [cells[i] for i in pixel_cols]
        try:
            a = np.array(values, dtype=np.int64)
            if a.min() < 0 or a.max() > 255:
                raise ValueError
        except (ValueError, OverflowError):
            k = next(k for k, v in enumerate(values) if not (_int(v.strip()) is not None and 0 <= int(v) <= 255))
            raise DataError(f"{name}: line {line}: pixel{k} is {values[k][:MAX_CELL_CHARS]!r}, not a pixel value "
                            "(an integer 0-255)") from None
        images.append(a.astype(np.uint8).reshape(side, side))
        where.append(f"{scan.where(path)}:{line}")
        if label_col is not None:
            labels.append((f"{name}: line {line}", cells[label_col]))
    return {"images": np.stack(images) if images else np.zeros((0, side, side), np.uint8), "rows": where,
            "name": scan.where(path), "label": labels if label_col is not None else None}


def _path_table(scan: _Scan, path: Path, name: str, header: list, rows) -> dict:
    """Rows of path,label: each path relative to the CSV's folder, inside it, an image file."""
    path_col, label_col = (header.index(c) if c in header else None for c in ("path", "label"))
    if path_col is None:
        raise DataError(f"{name}: line 1: no 'path' column (the header is: {', '.join(header)[:200]}); expected "
                        "path,label or label,pixel0,...")
    found, labels = [], []
    for line, cells in rows:
        if len(cells) != len(header):
            raise DataError(f"{name}: line {line}: {len(cells)} cells, the header has {len(header)}")
        cell, where = cells[path_col].strip(), f"{scan.where(path)}:{line}"
        if not cell or "\0" in cell:
            raise DataError(f"{name}: line {line}: {'a NUL byte in the' if cell else 'an empty'} path")
        target = os.path.realpath(path.parent / cell)
        if not _inside(target, scan.folder):
            raise DataError(f"{name}: line {line}: {cell[:200]} leads to {target}, outside {scan.folder}; refused")
        if Path(cell).suffix.lower() not in IMAGE_SUFFIXES:
            scan.skip(where, f"{cell[:200]}: not an image ({Path(cell).suffix or 'no extension'})")
            continue
        try:
            st = os.stat(target)
        except OSError as e:
            scan.skip(where, f"{cell[:200]}: {e.strerror or e}")
            continue
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else _kind(st.st_mode)
            raise DataError(f"{name}: line {line}: {cell[:200]} is {kind}, not a file; refused")
        scan.count_image()
        found.append((Path(target), where, _stat_key(st)))
        if label_col is not None:
            labels.append((f"{name}: line {line}", cells[label_col]))
    return {"rows": found, "label": labels if label_col is not None else None}


# --------------------------------------------------------------------------- NPZ

def _list_npz(scan: _Scan) -> Listing:
    npz = [p for p, kind, _ in scan.children(scan.root) if kind == "file" and p.suffix.lower() == ".npz"] \
        if scan.root.is_dir() else [scan.root]
    if len(npz) != 1:
        raise DataError(f"{scan.given}: {len(npz) or 'no'} .npz files; name the one to read")
    path = npz[0]
    name = scan.name(path)
    members = check_zip(path, {}, MAX_ARRAY_BYTES, max_members=64, what="an .npz of arrays", error=DataError)
    present = {m.filename[:-4] for m in members if m.filename.endswith(".npy")}
    pairs = _npz_pairs(present, name)
    keys = [k for _, x, y in pairs for k in (x, y) if k] + (["class_names"] if "class_names" in present else [])

    def check(key, shape, dtype):
        if key == "class_names":
            if len(shape) != 1 or dtype.kind != "U" or shape[0] > MAX_CLASSES:
                raise DataError(f"{name}: class_names must be a 1-D array of at most {MAX_CLASSES:,} strings, got "
                                f"shape {shape} of {dtype}")
        elif key.startswith("x"):
            check_array_header(f"{name}[{key}]", shape, dtype)
            scan.count_image(shape[0])
        elif len(shape) != 1 or shape[0] > scan.max_files:  # labels: as many as images, checked once loaded
            raise DataError(f"{name}[{key}]: shape {shape}; expected labels (N,) with N at most data.max_files")

    try:
        loaded = dict(zip(keys, load_npz_arrays(path, keys, MAX_ARRAY_BYTES, "needs x_train and y_train", check)))
    except RuntimeError as e:  # zipfile: a member flagged as encrypted (load_npz_arrays turns the rest to one line)
        raise DataError(f"{name}: not a readable .npz ({e})") from None
    class_names = [str(c) for c in loaded["class_names"]] if "class_names" in loaded else None
    arrays = {}
    for split, x, y in pairs:
        where = f"{scan.where(path)}[{x}]"
        images = array_pixels(loaded[x], f"{name}[{x}]")
        labels = _label_array(loaded[y], f"{name}[{y}]", class_names) if y else np.full(len(images), -1, np.int64)
        if len(labels) != len(images):
            raise DataError(f"{name}: {x} has {len(images)} images and {y} {len(labels)} labels")
        arrays[split] = ArraySplit(images, labels, where)
    names = class_names or _number_names([a.labels for a in arrays.values()])
    return Listing(scan.root, "npz", names, [], arrays, scan.skipped, [path])


def _npz_pairs(present: set, name: str) -> list:
    """[(split, images key, labels key or None)] of an .npz's arrays."""
    for x, y in (("x_train", "y_train"), ("x_test", "y_test"), ("x_val", "y_val"), ("x", "y")):
        if (x in present) != (y in present) and not (x == "x_test" and x in present):  # x_test alone: predict
            raise DataError(f"{name}: has {x if x in present else y} but not {y if x in present else x}")
    if "x_train" not in present and "x" not in present:
        raise DataError(f"{name}: needs arrays x_train and y_train (it holds {', '.join(sorted(present)) or 'none'})")
    test = "test" if "y_test" in present else "predict"
    pairs = [("train" if test == "test" else "pool", "x_train", "y_train")] if "x_train" in present \
        else [("pool", "x", "y")]
    pairs += [(test, "x_test", "y_test" if test == "test" else None)] if "x_test" in present else []
    return pairs + ([("val", "x_val", "y_val")] if "x_val" in present else [])


# --------------------------------------------------------------------------- IDX

def _list_idx(scan: _Scan) -> Listing:
    """A folder of IDX files, or one of them named (then the files beside it with the same prefix)."""
    named = IDX_NAME.fullmatch(scan.root.name) if scan.root.is_file() else None
    if scan.root.is_file() and not named:
        raise DataError(f"{scan.given}: not named as an IDX file (*train-images-idx3-ubyte[.gz], ...)")
    found = {}
    for p, kind, _ in scan.children(scan.folder, IDX_NAME.fullmatch):  # others beside a named file: not looked at
        m = IDX_NAME.fullmatch(p.name) if kind == "file" else None
        if m and (named is None or m["prefix"] == named["prefix"]):
            split = "train" if m["split"].lower() == "train" else "test"
            found.setdefault(m["prefix"], {}).setdefault((split, m["kind"].lower()), []).append(p)
    if not found:
        raise DataError(f"{scan.given}: no IDX files (*train-images-idx3-ubyte[.gz], *train-labels-idx1-ubyte[.gz])")
    if len(found) > 1:
        raise DataError(f"{scan.given}: IDX files of several datasets ({', '.join(sorted(found))[:200]}); name a file")
    (prefix, files), = found.items()
    arrays = {}
    for split in ("train", "test"):
        pair = [files.get((split, kind), []) for kind in ("images", "labels")]
        if not any(pair) and split == "test":
            continue
        for paths, kind in zip(pair, ("images", "labels")):
            if len(paths) != 1:
                raise DataError(f"{scan.given}: {'no' if not paths else 'several'} {prefix}{split}-{kind} IDX "
                                f"file{'s' if paths else ''} ({', '.join(p.name for p in paths) or 'none'})")
        x, y = _idx_pair(scan, pair[0][0], pair[1][0], prefix)
        scan.count_image(len(x))
        arrays[split] = ArraySplit(x, y, scan.where(pair[0][0]))
    arrays = arrays if "test" in arrays else {"pool": arrays["train"]}
    return Listing(scan.root, "idx", _number_names([a.labels for a in arrays.values()]), [], arrays, scan.skipped,
                   sorted(p for v in files.values() for p in v))


def _idx_pair(scan: _Scan, images_path: Path, labels_path: Path, prefix: str):
    """(images, labels) of one split's two IDX files: images (N, h, w), as many labels, each a class number.
    EMNIST stores its images transposed (column by column): they are turned upright here."""
    arrays = []
    for p, dims in ((images_path, 3), (labels_path, 1)):
        a = read_idx(p, limit=MAX_ARRAY_BYTES)  # EMNIST byclass is 547 MB; a FIFO was refused by the listing
        if a.ndim != dims:
            raise DataError(f"{scan.name(p)}: an IDX of {a.ndim} dimension(s) where "
                            f"{'images (3)' if dims == 3 else 'labels (1)'} were expected")
        arrays.append(a)
    x, y = arrays
    if len(x) != len(y):
        raise DataError(f"{scan.name(images_path)}: {len(x):,} images, but {labels_path.name} has {len(y):,} labels")
    if prefix.lower().startswith("emnist"):
        x = np.ascontiguousarray(x.transpose(0, 2, 1))
    return x, _label_array(y.astype(np.int64), scan.name(labels_path), None)
