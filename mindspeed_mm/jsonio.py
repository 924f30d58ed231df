"""JSON files in and out (data, model and inference configs): one-line errors with file, line and column; atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading

from mindspeed_mm.errors import UserError


class DataFileError(UserError, ValueError):
    """An unreadable or malformed input file; str() is one line naming the file."""


def load_json(path: str):
    """Parse a JSON file. Bytes that are not UTF-8 survive as lone surrogates
    (surrogateescape), so one bad string drops one sample instead of the whole file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataFileError(f"{path}: cannot read: {e.strerror or e}") from None
    text = raw.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None


def has_bad_text(s: str) -> bool:
    """True for strings carrying lone surrogates (undecodable bytes or bad \\u escapes)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def apply_umask_mode(fd_or_path, mode: int = 0o666) -> None:
    """Give a file made by tempfile.mkstemp (always 0600) the mode a plain open() would: ``mode & ~umask``."""
    os.chmod(fd_or_path, mode & ~current_umask())


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str = "utf-8", suffix: str = ".tmp"):
    """Open a temp file beside ``path``; on a clean exit it is flushed, fsynced and renamed onto ``path``
    (readers see the old or the new file, never half), with the umask's permissions as open() gives them.
    On an exception the temp file is removed and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    try:
        apply_umask_mode(fd)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str, data, indent=None) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    with atomic_open(path, "w", suffix=".json") as f:
        json.dump(data, f, ensure_ascii=False, indent=indent)
        f.write("\n")
