"""Write a whole output folder under a temporary name and rename it into place at the end.

An interrupted conversion leaves only ``SAVE.tmp-<pid>`` (removed on a Python
exception), never something that looks like a complete checkpoint.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

from checkpoint.layout import replace_dir
from mindspeed_mm.errors import UserError


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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, save_dir)
