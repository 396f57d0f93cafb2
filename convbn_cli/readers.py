"""The one bounded, validated way convbn reads a file it did not just write: the files of runs and sweeps (which
anyone may have edited, damaged or replaced) and a user's own files (configs, arrays, pictures, .keras archives).

Every read here
- refuses what is not a regular file before reading a byte: a FIFO would block forever and a device never ends
  (the file is opened non-blocking, then fstat'ed);
- knows the most bytes it may take, and checks the size the file, archive member or header declares before
  anything is allocated: a small file that declares or inflates to gigabytes is refused, not decoded;
- turns every failure into one ConvbnError line (exit 2) naming the file, never a traceback.

The parsers themselves are the well-kept ones (json, zipfile, NumPy's .npy header reader, Pillow); what is
written here is only the bounding and the refusal, which none of them does for us.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import struct
import zipfile
from pathlib import Path

from .errors import ConvbnError


def size_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


@contextlib.contextmanager
def open_regular(path, error=ConvbnError):
    """A binary file object for `path`, which must be a regular file (a symbolic link to one is followed)."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once (a plain open would wait for one forever)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "not a regular file")
            raise error(f"{path}: is {kind}, not a file; refused")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def check_size(path, f, limit: int, what: str, error=ConvbnError) -> int:
    size = os.fstat(f.fileno()).st_size
    if size > limit:
        raise error(f"{path}: {size_text(size)}, more than {what} can be ({size_text(limit)}); refused")
    return size


def read_bytes(path, limit: int, what: str = "this file", error=ConvbnError) -> bytes:
    """At most `limit` bytes: a larger file (by its size, or by what it turns out to hold) is refused."""
    with open_regular(path, error) as f:
        check_size(path, f, limit, what, error)
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > limit:  # it grew after the size was read
        raise error(f"{path}: more than {what} can be ({size_text(limit)}); refused")
    return data


def check_files(paths, limit: int, what: str, error=ConvbnError) -> None:
    """Files another reader will open (TensorFlow's checkpoint and SavedModel readers, which block on a FIFO and
    read whatever a file holds): each must be a regular file (a link to one is followed; nothing is opened, so
    nothing blocks), and together at most `limit` bytes."""
    total = 0
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise error(f"{p}: cannot read: {e.strerror or e}") from None
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, a device or a socket)"
            raise error(f"{p}: is {kind} where {what} keeps a file; refused")
        total += st.st_size
    if total > limit:
        raise error(f"{what}: {size_text(total)} in all, more than it can be ({size_text(limit)}); refused")


def read_text(path, limit: int, what: str = "this file", error=ConvbnError) -> str:
    try:
        return read_bytes(path, limit, what, error).decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None


def parse_json(text, where, error=ConvbnError):
    """JSON -> Python; damaged or absurdly nested JSON (a RecursionError in the decoder) is one line."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())[:120]
        raise error(f"{where}: not valid JSON ({why})") from None


def read_json(path, limit: int, what: str = "this file", error=ConvbnError):
    return parse_json(read_text(path, limit, what, error), path, error)


def read_json_lines(path, limit: int, what: str = "this file", error=ConvbnError) -> list:
    """[(line number, object)] of a JSON-lines file, blank lines skipped."""
    rows = []
    for n, line in enumerate(read_text(path, limit, what, error).splitlines(), 1):
        if line.strip():
            rows.append((n, parse_json(line, f"{path}: line {n}", error)))
    return rows


# --------------------------------------------------------------------------- zip archives (.keras, .npz)

def check_zip(path, limits: dict, default_limit: int, *, max_members: int = 1000, total_limit: int | None = None,
              what: str = "an archive", error=ConvbnError) -> list:
    """The members of the zip archive at `path` (a list of ZipInfo), each declaring at most its limit (`limits`
    by member name, else `default_limit`) of uncompressed bytes. Python's zipfile never returns more than a
    member declares (and fails the CRC check of one that holds more), so checking the declarations bounds every
    later read, whoever does it (Keras, NumPy)."""
    with open_regular(path, error) as f:
        _check_directory_record(path, f, max_members, what, error)
        try:
            with zipfile.ZipFile(f) as zf:
                members = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError,
                struct.error) as e:  # the ways a damaged archive fails in zipfile
            raise error(f"{path}: not {what} (not a readable zip archive: {' '.join(str(e).split())[:120]})") \
                from None
    if len(members) > max_members:
        raise error(f"{path}: {len(members)} archive members, more than {what} has ({max_members}); refused")
    total = 0
    for m in members:
        limit = limits.get(m.filename, default_limit)
        if m.file_size > limit:
            raise error(f"{path}: member {m.filename[:80]!r} declares {size_text(m.file_size)}, more than {what} "
                        f"holds there ({size_text(limit)}); refused")
        total += m.file_size
    if total_limit is not None and total > total_limit:
        raise error(f"{path}: its members declare {size_text(total)} in all, more than {what} holds "
                    f"({size_text(total_limit)}); refused")
    return members


MEMBER_RECORD_BYTES = 1024  # a central directory entry: 46 bytes, a name, extra fields and a comment


def _check_directory_record(path, f, max_members, what, error) -> None:
    """Count an archive's members from its end-of-central-directory record before zipfile parses them: zipfile
    builds an object for every entry in the central directory, however many millions a small file declares."""
    size = os.fstat(f.fileno()).st_size
    tail_size = min(size, 22 + 0xFFFF)  # the record (22 bytes) and a comment of at most 64 KiB
    f.seek(size - tail_size)
    tail = f.read(tail_size)
    f.seek(0)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        raise error(f"{path}: not {what} (not a zip archive)")
    _, _, _, _, entries, directory_bytes = struct.unpack_from("<4s4HL", tail, at)  # the record's first fields
    if entries > max_members or directory_bytes > max_members * MEMBER_RECORD_BYTES:
        raise error(f"{path}: declares {entries if entries < 0xFFFF else 'too many'} archive members "
                    f"({size_text(directory_bytes)} of directory), more than {what} has; refused")


# --------------------------------------------------------------------------- NumPy arrays

def array_header(f, where, error=ConvbnError):
    """(shape, dtype) from the header of an .npy stream, read with NumPy's own (bounded) header reader: nothing of
    the data is allocated."""
    import numpy as np

    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except Exception as e:  # noqa: BLE001  NumPy parses the header as a Python literal: a damaged one fails in
        # many ways (ValueError, SyntaxError, tokenize.TokenError, ...); a signal is not an Exception here
        raise error(f"{where}: not a readable .npy array ({' '.join(str(e).split())[:120]})") from None
    return tuple(shape), dtype


def array_bytes(shape, dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize
