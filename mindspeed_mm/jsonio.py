"""Files in and out: JSON read with one-line errors (file, line, column), the one atomic file writer
(:func:`atomic_path`, with :func:`atomic_open`, :func:`write_text_atomic` and :func:`write_json_atomic`
over it) and the folder swap (:func:`replace_dir`).  Typed configs are read by mindspeed_mm/typed_json.py."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading

from mindspeed_mm.errors import UserError


class DataFileError(UserError, ValueError):
    """An unreadable or malformed input file; str() is one line naming the file."""


def load_json(path: str):
    """Parse a JSON file. Bytes that are not UTF-8 survive as lone surrogates
    (surrogateescape), so one bad string drops one sample instead of the whole file."""
    return load_json_text(path)[0]


def load_json_text(path: str):
    """(the parsed JSON of a file, its text): the text gives the line and column of a bad key later."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataFileError(f"{path}: cannot read: {e.strerror or e}") from None
    text = raw.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text), text
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
def atomic_path(path: str, suffix: str = ".tmp", sync: bool = True):
    """The one atomic writer: yield a temporary path beside ``path`` for the caller (or a library such as
    safetensors) to write a file at; on a clean exit the file is fsynced (unless ``sync`` is False: a file
    inside a folder that is itself published by a rename, where an fsync only waits for the disk), given
    the mode a plain open() gives (``0o666 & ~umask``; mkstemp makes 0600) and renamed onto ``path``:
    readers see the old file or the new one, never half.  On an exception the temporary file is removed
    and ``path`` is untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        apply_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", encoding: str = "utf-8", suffix: str = ".tmp", sync: bool = True):
    """:func:`atomic_path` as an open file."""
    with atomic_path(path, suffix, sync) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
        yield f


def write_text_atomic(path: str, text: str, sync: bool = True) -> None:
    """Replace a (small) text file atomically (``sync``: see :func:`atomic_path`)."""
    with atomic_open(path, "w", suffix=os.path.splitext(path)[1] or ".tmp", sync=sync) as f:
        f.write(text)


def replace_dir(tmp: str, final: str) -> None:
    """Move a finished temporary folder to ``final``, replacing an older one (checkpoints, the data cache)."""
    if os.path.isdir(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_json_atomic(path: str, data, indent=None, sync: bool = True) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    write_text_atomic(path, json.dumps(data, ensure_ascii=False, indent=indent) + "\n", sync)
