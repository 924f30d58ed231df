"""JSON files in and out (data, model and inference configs): one-line errors with file, line and column; atomic writes."""

from __future__ import annotations

import json
import os
import tempfile

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


def write_json_atomic(path: str, data, indent=None) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
