"""Write a whole output folder under a temporary name and rename it into place at the end.

An interrupted conversion leaves only ``SAVE.tmp-<pid>`` (removed on a Python
exception), never something that looks like a complete checkpoint.  A full
disk (ENOSPC, EDQUOT, or EFBIG past a file size limit) while writing is a
one-line :class:`DiskFullError` naming the file; the temporary folder is removed.
"""
from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager

from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import replace_dir


DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if e)
# ... and torch.save's, whose zip writer drops the errno ("unexpected pos N vs M").
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "file too large", "unexpected pos",
                   "pytorchstreamwriter failed writing")


class DiskFullError(UserError):
    """Writing a file failed for want of space (or past the file size limit)."""


def disk_full_error(exc: BaseException, path: str):
    """A :class:`DiskFullError` naming ``path`` when ``exc`` is a full-disk failure, else None.
    Knows OSError's errno and the text of writers that hide it (safetensors' SafetensorError)."""
    if isinstance(exc, DiskFullError):
        return exc
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        reason = exc.strerror or os.strerror(exc.errno)
        path = exc.filename or path
    else:
        text = str(exc).lower()
        if not any(t in text for t in _DISK_FULL_TEXT):
            return None
        reason = str(exc).splitlines()[0]
    return DiskFullError(f"{path}: no space left on device ({reason}); nothing was written")


@contextmanager
def writing(path: str):
    """Around one file's write: a full disk becomes a one-line DiskFullError naming ``path``."""
    try:
        yield
    except Exception as exc:
        err = disk_full_error(exc, path)
        if err is None or err is exc:
            raise
        raise err from None


def check_save_dir(save_dir: str, overwrite: bool, load_dirs=()) -> None:
    """Fail before anything is written: save dir is a file, a source, or not empty without --overwrite."""
    real = os.path.realpath(save_dir)
    for d in load_dirs:
        if d and os.path.realpath(d) == real:
            raise UserError(f"--save-dir {save_dir}: is the same folder as the input {d}")
    if os.path.exists(save_dir):
        if not os.path.isdir(save_dir):
            raise UserError(f"--save-dir {save_dir}: exists and is not a directory")
        if os.listdir(save_dir) and not overwrite:
            raise UserError(f"--save-dir {save_dir}: not empty (pass --overwrite to replace it)")


@contextmanager
def staged_dir(save_dir: str):
    """Yield a fresh sibling temporary folder; on success it replaces ``save_dir``."""
    save_dir = os.path.normpath(save_dir)
    parent = os.path.dirname(os.path.abspath(save_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = f"{save_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as exc:
        raise UserError(f"--save-dir {save_dir}: cannot create ({exc.strerror or exc})") from None
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = disk_full_error(exc, save_dir) if isinstance(exc, Exception) else None
        if err is None or err is exc:
            raise
        raise err from None
    replace_dir(tmp, save_dir)
