"""Atomic writes, the one way convbn writes a file or a directory: a kill at any moment leaves either the old
file or the complete new one, never a half-written one.

Everything is first written to a temporary name in the same directory (so the final rename stays on one file
system, where it is atomic) and then renamed into place; a failure removes the temporary.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """Open a temporary file beside `path` for writing; on success it is synced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file 0600; give it the mode any other new file would get (the umask's)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_bytes_atomic(path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def staged(path, before_replace=None):
    """Yield a temporary path beside `path` (for a file or a whole directory, e.g. a SavedModel); move it into
    place only if the block succeeds. A failed write then leaves nothing half-written at `path`, and an earlier
    file or directory at `path` is replaced only by a complete new one, after `before_replace()` (which raises to
    refuse) has checked it again: what the caller checked at the start may have changed meanwhile."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp / path.name
        if before_replace is not None and (path.exists() or path.is_symlink()):
            before_replace()
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        (tmp / path.name).rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


STALE_AFTER_S = 600  # a temporary this old belongs to a process that died (a write takes seconds)


def is_our_temporary(p: Path, name: str = None) -> bool:
    """Whether `p` is named as atomic_open/staged name their temporaries: `.NAME.<8 random characters>.tmp`
    (tempfile's names), for one NAME or any. Only such names are ever removed as leftovers."""
    stem = re.escape(name) if name is not None else ".+"
    return re.fullmatch(rf"\.{stem}\.[a-z0-9_]{{8}}\.tmp", p.name) is not None


def remove_stale_temporaries(folder, name: str) -> list:
    """Remove what a killed atomic write or staging of `folder/name` left behind (`.NAME.XXXXXXXX.tmp`, files or
    directories), once it is older than STALE_AFTER_S: a younger one may belong to a write still running."""
    folder, stale = Path(folder), []
    if not folder.is_dir():
        return stale
    for p in folder.iterdir():
        if not is_our_temporary(p, name):
            continue
        try:
            if time.time() - p.lstat().st_mtime > STALE_AFTER_S:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                stale.append(p)
        except FileNotFoundError:  # another process cleaned it first
            pass
    return stale


LOCK_NAME = ".owner.lock"


@contextlib.contextmanager
def scratch_dir(folder, name: str):
    """A temporary directory `folder/.NAME.XXXXXXXX.tmp` for a big download, removed afterwards. Its owner holds
    an flock on a file inside for as long as it lives, so that a later `remove_abandoned(folder, name)` can tell
    one whose process was killed (SIGKILL leaves no chance to clean up) from one still in use, at once instead of
    after STALE_AFTER_S. Falls back to the system's temporary directory where `folder` cannot be written."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder))
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix=f"convbn-{name}-"))
    lock = os.open(tmp / LOCK_NAME, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield tmp
    finally:
        os.close(lock)
        shutil.rmtree(tmp, ignore_errors=True)


def remove_abandoned(folder, name: str) -> list:
    """Remove the scratch_dir()s of `name` under `folder` whose owner is gone (their lock is free)."""
    removed, folder = [], Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not (is_our_temporary(p, name) and p.is_dir() and not p.is_symlink()):
            continue
        try:
            fd = os.open(p / LOCK_NAME, os.O_RDONLY)
        except OSError:  # no lock file: made in the instant between mkdtemp and the lock, or not ours
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its owner is alive
            continue
        finally:
            os.close(fd)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed
