"""Atomic writes, the one way convbn writes a file or a directory: a kill at any moment leaves either the old
file or the complete new one, never a half-written one.

Everything is first written to a temporary name in the same directory (so the final rename stays on one file
system, where it is atomic) and then renamed into place; a failure removes the temporary.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .errors import ConvbnError, WriteError


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", *, within=None):
    """Open a temporary file beside `path` for writing; on success it is synced and renamed over `path`. What the
    machine refuses (a full disk, a read-only place) is a WriteError naming `path`, never the temporary.

    `within`: a folder (a run directory) that must still exist: missing folders are made below it only, one at
    a time, so a run directory removed while it trains is never made again by a late write (`mkdir -p` would)."""
    path, tmp, in_block, made = Path(path), None, False, []
    try:
        made = make_dir(path.parent) if within is None else _make_below(Path(within), path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            in_block = True
            yield f
            in_block = False
            f.flush()
            os.fsync(f.fileno())
        give_usual_mode(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file
    except BaseException as e:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        _remove_empty(made)
        mapped = _staging_error(e, tmp, path, ours=not in_block)
        if mapped is e:
            raise
        raise mapped from None


def give_usual_mode(path) -> None:
    """mkstemp makes a file 0600; give it the mode any other new file would get (the umask's)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def remove_entry(p: Path) -> None:
    """Remove a file, a link (never what it points to) or a whole directory tree: one of convbn's own, which the
    caller has identified as such."""
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def write_text_atomic(path, text: str, *, within=None) -> None:
    with atomic_open(path, "w", within=within) as f:
        f.write(text)


def write_bytes_atomic(path, data: bytes, *, within=None) -> None:
    with atomic_open(path, "wb", within=within) as f:
        f.write(data)


def write_json_atomic(path, obj, *, within=None) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", within=within)


def _make_below(root: Path, path: Path) -> list:
    """The folders between `root` (which must exist) and `path`, made one by one (never `root` or above it);
    returns those made, outermost first."""
    if not root.is_dir():
        raise WriteError(path, f"not written: {root} is gone (removed while convbn was writing into it)")
    made = []
    for part in [p for p in reversed([path.parent, *path.parent.parents]) if p.is_relative_to(root) and p != root]:
        if not part.is_dir():
            try:
                os.mkdir(part)  # fails when its parent (ultimately `root`) vanished: nothing is made again
            except FileNotFoundError:
                _remove_empty(made)
                raise WriteError(path, f"not written: {root} is gone (removed while convbn was writing into it)") \
                    from None
            made.append(part)
    return made


@contextlib.contextmanager
def staged(path, before_replace=None):
    """Yield a temporary path beside `path` (for a file or a whole directory, e.g. a SavedModel); move it into
    place only if the block succeeds. A failed write then leaves nothing half-written at `path`, and an earlier
    file or directory at `path` is replaced only by a complete new one, after `before_replace()` (which raises to
    refuse) has checked it again: what the caller checked at the start may have changed meanwhile. A write the
    machine refuses, in the block (TensorFlow's too) or here, is a WriteError naming `path`."""
    path, tmp, in_block, made = Path(path), None, False, []
    try:
        made = make_dir(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        in_block = True
        yield tmp / path.name
        in_block = False
        if before_replace is not None and (path.exists() or path.is_symlink()):
            before_replace()
        _swap_in(tmp / path.name, path, tmp / ".replaced")
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        mapped = _staging_error(e, tmp, path, ours=not in_block)
        if mapped is e:
            raise
        raise mapped from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, path: Path, aside: Path) -> None:
    """Rename `new` to `path`. A file replaces an earlier file or link in one atomic os.replace, as atomic_open's
    do. An earlier directory (a SavedModel) cannot be replaced so: it is first moved `aside` (into the staging
    directory, removed with it) and moved back if the rename fails (a SIGKILL between the two renames leaves it
    there, in the staging directory)."""
    if not new.is_dir() and not path.is_dir():
        os.replace(new, path)
        return
    had = path.exists() or path.is_symlink()
    if had:
        path.rename(aside)
    try:
        new.rename(path)
    except BaseException:
        if had:
            aside.rename(path)
        raise


def make_dir(folder) -> list:
    """`mkdir -p folder`; returns the directories it made, outermost first. A file or a dangling symbolic link in
    the way is a WriteError that says so (Python's own word for both is "File exists")."""
    folder = Path(folder)
    made = [p for p in reversed([folder, *folder.parents]) if not os.path.lexists(p)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return made
    except OSError as e:
        _remove_empty(made)  # those it made before it failed
        if not isinstance(e, (FileExistsError, NotADirectoryError)):
            raise
        for p in reversed([folder, *folder.parents]):  # the topmost one in the way
            if os.path.lexists(p) and not p.is_dir():
                if p.is_symlink():
                    raise WriteError(p, f"not a directory (a symbolic link to {os.readlink(p)}, which "
                                        f"{'is not a directory' if p.exists() else 'does not exist'})") from None
                raise WriteError(p, "not a directory (a file is in the way)") from None
        raise


def _remove_empty(made) -> None:
    """Remove the directories a failed write made (make_dir's list), innermost first, while they are empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # something else is in it now, or it cannot be removed: kept
            return


# The OS errors a write meets. Their causes keep the machine's own words (what a search for them finds).
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
# what only a write meets: raised without a file name (write, flush, fsync), such an error is the write's
WRITE_ONLY = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
# the ones looked for in TensorFlow's messages: its errors carry the OS error as text only (a full disk is a
# ResourceExhaustedError, a read-only one a PermissionDeniedError, others FailedPrecondition or Unknown)
TF_WRITE_ERRNOS = (*WRITE_ONLY, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTDIR, errno.EISDIR,
                   errno.ENAMETOOLONG, errno.ELOOP)


def is_tensorflow_error(exc) -> bool:
    """Whether `exc` is a tf.errors.OpError (told without importing TensorFlow)."""
    return any(c.__name__ == "OpError" and c.__module__.startswith("tensorflow") for c in type(exc).__mro__)


def os_errno(exc, codes=TF_WRITE_ERRNOS):
    """The OS error number behind `exc`: an OSError's own, or the first of `codes` whose text a TensorFlow
    error's message holds; None for anything else."""
    if isinstance(exc, OSError):
        return exc.errno
    if is_tensorflow_error(exc):
        message = str(getattr(exc, "message", exc))
        return next((code for code in codes if os.strerror(code) in message), None)
    return None


def write_error(exc, path, codes=TF_WRITE_ERRNOS):
    """A WriteError naming `path` for an OS error met writing it (an OSError, or a TensorFlow error whose message
    names one of `codes`); None for anything else."""
    if isinstance(exc, WriteError):
        return exc
    code = os_errno(exc, codes)
    if code is None:
        return None
    text = (exc.strerror if isinstance(exc, OSError) else None) or os.strerror(code)
    return WriteError(user_path(path), f"{'not writable' if code in _NOT_WRITABLE else 'cannot write it'}: {text}")


@contextlib.contextmanager
def writing(path, relabel: bool = False):
    """Turn what writing `path` raises (an OSError, or a TensorFlow error that names an OS error) into one
    WriteError naming `path`; with `relabel`, also a WriteError about a file inside (it names `path` instead)."""
    try:
        yield
    except WriteError as e:
        if not relabel:
            raise
        raise WriteError(path, e.cause) from None
    except Exception as e:
        mapped = write_error(e, path)
        if mapped is None:
            raise
        raise mapped from None


def _staging_error(exc, tmp, path, ours: bool):
    """What to raise for `exc`, met writing `path` through the temporary `tmp`: a WriteError naming `path` for an
    OS error of convbn's own writing (`ours`), or of the caller's block when it names the temporary or could only
    come from a write (a full disk, a read-only place); else `exc` itself (a read error, a refusal, a bug)."""
    if not isinstance(exc, Exception) or isinstance(exc, ConvbnError):
        return exc
    code = os_errno(exc)
    if code is None:
        return exc
    if isinstance(exc, OSError):
        named = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    else:
        named = [str(getattr(exc, "message", exc))]
    about_tmp = tmp is not None and any(str(tmp) in n for n in named)
    if ours or about_tmp or (code in WRITE_ONLY and (not named or not isinstance(exc, OSError))):
        return write_error(exc, path)
    return exc


def tensorflow_write_error(exc):
    """A WriteError for a TensorFlow error that says a write met a full disk or a read-only place, wherever it came
    from (the last resort of the CLI's handler; the writers themselves name the path they meant): the path its
    message names, as the user knows it; None for any other error."""
    code = os_errno(exc, WRITE_ONLY) if is_tensorflow_error(exc) else None
    if code is None:
        return None
    message = " ".join(str(getattr(exc, "message", exc)).split())
    m = re.search(rf"(\S+); {re.escape(os.strerror(code))}", message)
    # TensorFlow's own staging: a checkpoint's `ckpt-N_temp/part-...`, an events file's `...tempstate123`
    path = re.sub(r"_temp/.*$|\.tempstate\d+$", "", m.group(1)) if m else "a file"
    return write_error(exc, path, WRITE_ONLY)


_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp")


def user_path(p) -> str:
    """`p` as the user knows it: a path in (or of) one of atomic_open's or staged's temporaries `.NAME.XXXXXXXX.tmp`
    is the destination NAME beside it."""
    parts = Path(p).parts
    for i, part in enumerate(parts):
        m = _TEMPORARY.fullmatch(part)
        if m:
            return str(Path(*parts[:i], m.group(1)))
    return str(p)


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
                remove_entry(p)
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
