"""One loader for the typed JSON files (model, data and inference JSON): a JSON object -> dataclasses.

Supports nested dataclasses, ``Optional[...]``, ``List[...]``, ``Dict[str, ...]``, ``dict`` and the
scalars int / float / bool / str (a JSON ``true`` is not an int; an int is a fine float).  Unknown keys
are rejected; a field with ``metadata={"json": False}`` is not a JSON key (set by flags or code).
Errors are one line, ``FILE: KEY: what is wrong, line L, column C``, the position being that of the
offending key or value in the file.  Each JSON kind words its errors with a :class:`Wording` (their
texts predate this loader and are quoted by users and tests).  Rules of one config (ranges, choices)
stay with its class.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from json.decoder import scanstring
from typing import Optional, Tuple

from mindspeed_mm.errors import UserError

Path = Tuple[typing.Union[str, int], ...]  # object keys and list indices from the document's root


@dataclasses.dataclass(frozen=True)
class Wording:
    """How one JSON kind words its errors.  Templates see: {key} the dotted path ('text.num_layers'),
    {name} its last part, {at_key} / {at_parent} the path or its parent followed by ': ' (empty at the
    top), {want} the expected type, {got} the JSON value's Python type, {value} its repr, {known} the keys."""
    error: type = UserError
    unknown_key: str = "{at_key}unknown key (known: {known})"
    wrong_type: str = "{at_key}expected {want}, got {got} {value}"
    not_object: str = "{at_key}expected an object, got {got}"
    missing: str = "{at_key}required key is missing"


class TypedJSONError(UserError, ValueError):
    """A value that does not fit its dataclass field; ``path`` leads to it, ``at_key`` when the key is wrong."""

    def __init__(self, message: str, path: Path, at_key: bool = False):
        super().__init__(message)
        self.path, self.at_key = path, at_key


def json_fields(cls) -> dict:
    """The fields of dataclass ``cls`` that are JSON keys, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("json", True)}


def from_json_value(cls, data, wording: Wording = Wording(), source: Optional[str] = None,
                    text: Optional[str] = None):
    """``data`` (parsed JSON) as dataclass ``cls``; errors are ``wording.error`` prefixed with ``source``
    (the file) and, when ``text`` (the file's JSON) is given, followed by the line and column."""
    try:
        return _build(cls, data, (), wording)
    except TypedJSONError as e:
        message = str(e) + position_text(text, e.path, e.at_key)
        raise wording.error(f"{source}: {message}" if source else message) from None


# ---- JSON value -> dataclass ------------------------------------------------------------------

def _dotted(path: Path) -> str:
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else f".{step}" if out else step
    return out


def _fail(template: str, path: Path, at_key: bool = False, **values):
    last = max([i for i, step in enumerate(path) if isinstance(step, str)], default=0)  # list items: 'xs[2]'
    key, parent, name = _dotted(path), _dotted(path[:last]), _dotted(path[last:])
    message = template.format(key=key, name=name, at_key=f"{key}: " if key else "",
                              at_parent=f"{parent}: " if parent else "", **values)
    raise TypedJSONError(message, path, at_key)


def _json_type(value) -> str:
    return type(value).__name__


def _build(cls, data, path: Path, wording: Wording):
    if not isinstance(data, dict):
        _fail(wording.not_object, path, got=_json_type(data))
    known = json_fields(cls)
    for key in data:
        if key not in known:
            _fail(wording.unknown_key, path + (key,), at_key=True, known=", ".join(known))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], path + (name,), wording)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(wording.missing, path + (name,))
    return cls(**kwargs)


def _convert(value, tp, path: Path, wording: Wording):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]: null or an X
        if value is None and type(None) in args:
            return None
        (tp,) = [a for a in args if a is not type(None)]
        return _convert(value, tp, path, wording)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, wording)
    if tp is typing.Any:
        return value
    want = origin or tp
    ok = isinstance(value, (int, float) if want is float else want)
    if isinstance(value, bool) and want is not bool:  # bool is an int subclass; JSON true is not a number
        ok = False
    if not ok:
        _fail(wording.wrong_type, path, want=getattr(want, "__name__", str(want)), got=_json_type(value),
              value=repr(value))
    if want is list and args:
        return [_convert(v, args[0], path + (i,), wording) for i, v in enumerate(value)]
    if want is dict and args:
        return {k: _convert(v, args[1], path + (k,), wording) for k, v in value.items()}
    return float(value) if want is float else value


# ---- where a path is in the JSON text ---------------------------------------------------------

_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip(text: str, i: int) -> int:
    return _SPACE.match(text, i).end()


def offset_of(text: str, path: Path, at_key: bool = False) -> int:
    """Offset in valid JSON ``text`` of the value at ``path`` (of its key with ``at_key``), or of the
    deepest object / list on the way when the path goes further than the document (a missing key)."""
    i = _skip(text, 0)
    for depth, step in enumerate(path):
        found = None
        if text[i] == "{":
            j = _skip(text, i + 1)
            while text[j] == '"':
                name, end = scanstring(text, j + 1)
                value = _skip(text, _skip(text, end) + 1)  # past the ':'
                if name == step:
                    found = j if at_key and depth == len(path) - 1 else value  # the last of duplicates wins
                j = _skip(text, _DECODER.raw_decode(text, value)[1])
                j = _skip(text, j + 1) if text[j] == "," else j
        elif text[i] == "[" and isinstance(step, int):
            j, index = _skip(text, i + 1), 0
            while text[j] != "]" and found is None:
                if index == step:
                    found = j
                j = _skip(text, _DECODER.raw_decode(text, j)[1])
                j = _skip(text, j + 1) if text[j] == "," else j
                index += 1
        if found is None:
            return i
        i = found
    return i


def position_text(text: Optional[str], path: Path, at_key: bool = False) -> str:
    """', line L, column C' of ``path`` in the JSON ``text``; '' when there is no text."""
    if text is None:
        return ""
    line, column = line_column(text, offset_of(text, path, at_key))
    return f", line {line}, column {column}"


def line_column(text: str, offset: int) -> Tuple[int, int]:
    """1-based line and column of ``offset``, counted as json's own decode errors count them."""
    line = text.count("\n", 0, offset) + 1
    return line, offset - text.rfind("\n", 0, offset)
