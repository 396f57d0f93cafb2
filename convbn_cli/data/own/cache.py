"""convbn's cache of the user's own dataset: the decoded, resized images of every split in one .npz, and a
manifest saying what they were made from.

What decides that the cache still holds the dataset. The cache is keyed by the *content*: a sha256 over every
file's relative name and the sha256 of all its bytes. Names, sizes, modification times and a sample of bytes
are not enough on their own: `cp -p`, `rsync -t`, `tar x` and `git checkout` set a modification time of the
user's (or tool's) choosing, a relabelled image keeps its size, and a changed pixel need not fall in a sample.
Reading every byte of 60,000 small files costs about as long as listing them, far less than decoding them.

Reading every byte on every run would still cost a second or two, so each file's (size, mtime_ns, ctime_ns,
inode, device) is recorded beside the hash, and a run whose files all show the same five values uses the cache
without reading them: the kernel sets ctime on every write, rename and metadata change, and no user-level tool
can set it back, so equal values on the same file system mean the same bytes. Any difference (a copy to
another machine, a `touch`) falls back to the full hash, which decides: the same content keeps the cache (the
new states are recorded), a different one says what changed and decodes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...files import atomic_open, write_json_atomic
from ...readers import check_zip, open_regular, read_json

CACHE_VERSION = 3
MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists every file: ~100 bytes each, 10 million at most
MAX_CACHE_MEMBER_BYTES = 16 << 30  # one decoded split; data.max_files bounds it long before this
HASH_CHUNK = 1 << 20


def entry_dir(cache_root: Path, root: Path, options: dict) -> Path:
    """Where the cache of the dataset at `root`, read with `options` (format, test split, file limit), lives: one
    folder per (absolute path, options). The manifest says which shape and resize rule the arrays have; another
    one decodes again into the same folder."""
    key = json.dumps({"root": str(root.resolve()), **options}, sort_keys=True)
    return cache_root / "own" / hashlib.sha256(key.encode()).hexdigest()[:24]


NO_STATE = (-1, -1, -1, -1, -1)  # a file that could not be stat'ed (a dangling link; the listing names it)


def states_and_digest(root: Path, files: list) -> tuple:
    """(relative name -> [size, mtime_ns, ctime_ns, inode, device], states_digest) from one walk: what decides the
    cache. For a folder, every file under it but hidden ones (so an added file is noticed); for a single file (an
    .npz, a CSV), `files`, the ones it was read from (a CSV of paths names its images), what lies beside it, and
    the folders of `files`."""
    names, states = _states(root, files)
    return {n: list(st) for n, st in zip(names, states.tolist())}, _digest(names, states)


def states_digest(root: Path, files: list) -> str:
    """One sha256 over those states, in name order: what a later run compares, without building (or reading back
    from JSON) a dictionary of every file."""
    return _digest(*_states(root, files))


def _digest(names: list, states) -> str:
    digest = hashlib.sha256("\0".join(names).encode("utf-8", "surrogateescape"))
    digest.update(states.tobytes())
    return digest.hexdigest()


def _states(root: Path, files: list) -> tuple:
    """(relative names, int64 states (N, 5)) in name order. Plain strings and os.scandir rather than pathlib: for
    60,000 files pathlib's objects alone cost a second, where the stat calls take 0.2-0.3 s on 2 cores (threads
    overlapping them were measured slower: the GIL hand-overs cost more than the calls)."""
    names, paths = [], []
    if root.is_dir():
        _walk(str(root), "", names, paths)
    else:  # a CSV, an .npz or an IDX file: what lies beside it (a test.csv or a t10k- file added), and the folders
        # holding the files it names (a named picture put back changes its folder), by their own states
        with os.scandir(root.parent) as it:
            beside = sorted((e.name, e.path) for e in it if not e.name.startswith("."))
        folders = sorted({os.path.dirname(str(p)) for p in files} | {str(root.parent)})
        names += [name for name, _ in beside] + [relative(Path(f), root) + "/" for f in folders]
        paths += [path for _, path in beside] + folders
    for path in files:
        names.append(relative(Path(path), root))
        paths.append(str(path))
    return names, np.array(_stat_all(paths) or np.zeros((0, 5)), np.int64).reshape(-1, 5)


def _stat_all(paths: list) -> list:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev))
        except OSError:
            out.append(NO_STATE)
    return out


def _walk(folder: str, prefix: str, names: list, paths: list) -> None:
    """The files below `folder` but hidden ones, in name order (no stat: a directory entry says what it is)."""
    with os.scandir(folder) as it:
        entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _walk(entry.path, prefix + entry.name + "/", names, paths)
        else:
            names.append(prefix + entry.name)
            paths.append(entry.path)


def relative_name(path: str, base: str) -> str:
    """relative() on strings, `base` the dataset's folder with a trailing separator: what the content hash names
    each file by (no pathlib objects per file)."""
    return path[len(base):] if path.startswith(base) else path


def relative(path: Path, root: Path) -> str:
    base = root if root.is_dir() else root.parent
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def content_hash(root: Path, files: list, listing: bytes = b"", progress: bool = False) -> str:
    """sha256 over (relative name, sha256 of all the bytes) of every file, in name order, and `listing` (what
    was made of them: names, splits, labels); see the module's docstring for why the whole content. A bar with an
    ETA on a terminal's stderr: a folder of large photos takes minutes."""
    from tqdm import tqdm

    total = hashlib.sha256(f"convbn-own-{CACHE_VERSION}".encode() + listing)
    base = str(root if root.is_dir() else root.parent).rstrip(os.sep) + os.sep
    named = sorted((relative_name(str(p), base), str(p)) for p in files)
    for name, path in tqdm(named, desc="hashing", unit="file", disable=None if progress else True, leave=False):
        total.update(name.encode("utf-8", "surrogateescape") + b"\0" + _file_digest(path))
    return total.hexdigest()


def _file_digest(path: str) -> bytes:
    """sha256 of a regular file's bytes, with os-level calls: open_regular's file objects cost as much again as
    the reading for 60,000 small files. Non-blocking open and fstat first: a FIFO put there since the listing is
    refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DataError(f"{path}: is not a regular file; refused")
        digest = hashlib.sha256()
        while chunk := os.read(fd, HASH_CHUNK):
            digest.update(chunk)
        return digest.digest()
    except BlockingIOError:  # (only a FIFO or a device reads so)
        raise DataError(f"{path}: is not a regular file; refused") from None
    finally:
        os.close(fd)


def changes(old: dict, new: dict) -> str:
    """What differs between two maps of file states, in words: '3 files changed, 1 added, 2 removed'."""
    changed = sum(1 for k in new if k in old and old[k] != new[k])
    added, removed = len(new.keys() - old.keys()), len(old.keys() - new.keys())
    parts = [f"{n} file{'s' if n != 1 else ''} {what}" for n, what in ((changed, "changed"), (added, "added"),
                                                                          (removed, "removed")) if n]
    return ", ".join(parts) or "nothing changed"


def read_manifest(folder: Path):
    """The manifest of a cache entry, or None where there is none or it is unusable (then the cache is rebuilt)."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    try:
        manifest = read_json(path, MAX_MANIFEST_BYTES, "a dataset cache's manifest", DataError)
    except DataError:
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != CACHE_VERSION:
        return None
    return manifest


def write(folder: Path, manifest: dict, arrays: dict, states: dict) -> None:
    """The arrays first, then the manifest that vouches for them, each atomically: a killed write leaves either
    the old cache or none that is used (the manifest, written last, names the arrays' size)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").unlink(missing_ok=True)  # no manifest vouches for arrays being replaced
    with atomic_open(folder / "arrays.npz", "wb") as f:
        np.savez(f, **arrays)
    write_manifest(folder, {**manifest, "version": CACHE_VERSION,
                            "arrays_size": (folder / "arrays.npz").stat().st_size}, states)


def write_manifest(folder: Path, manifest: dict, states: dict) -> None:
    """The manifest, and beside it every file's state (read back only to say what changed)."""
    write_json_atomic(folder / "states.json", states)
    write_json_atomic(folder / "manifest.json", manifest)


def read_states(folder: Path) -> dict:
    """The files' states the cache was made from; {} when unreadable (then every file counts as added)."""
    try:
        states = read_json(folder / "states.json", MAX_MANIFEST_BYTES, "a dataset cache's file list", DataError)
    except DataError:
        return {}
    return states if isinstance(states, dict) else {}


def read_arrays(folder: Path, manifest_size: int) -> dict:
    """The cached arrays, bounded like any file convbn did not just write (no pickles)."""
    path = folder / "arrays.npz"
    if path.stat().st_size != manifest_size:
        raise DataError(f"{path}: not the arrays its manifest describes (another size); delete {folder}")
    check_zip(path, {}, MAX_CACHE_MEMBER_BYTES, max_members=256, what="a dataset cache", error=DataError)
    try:
        with open_regular(path, DataError) as raw, np.load(raw, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: an unreadable dataset cache ({' '.join(str(e).split())[:200]})") from None


def own_caches(cache_root: Path) -> list:
    """What convbn's cache holds of the user's datasets (`convbn data info`): per entry its dataset's path, format,
    shape, images and size on disk, from the manifests (nothing is decoded)."""
    out = []
    for manifest_path in sorted((cache_root / "own").glob("*/manifest.json")):
        m = read_manifest(manifest_path.parent)
        if m is None:
            continue
        out.append({"dataset": m.get("root"), "format": m.get("format"), "image_shape": m.get("image_shape"),
                    "resize": m.get("resize"), "images": m.get("images"), "classes": len(m.get("class_names", [])),
                    "cache": str(manifest_path.parent), "size_bytes": m.get("arrays_size")})
    return out

