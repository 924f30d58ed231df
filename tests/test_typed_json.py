"""The one typed-JSON loader (mindspeed_mm/typed_json.py) and the three JSON kinds read through it."""
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import pytest

from mindspeed_mm.data.config import DataConfigError, load_data_config
from mindspeed_mm.errors import UserError
from mindspeed_mm.inference.arguments import parse_args
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from mindspeed_mm.typed_json import Wording, from_json_value, line_column, offset_of


@dataclass
class Inner:
    count: int = 1
    scale: float = 1.0
    ids: List[int] = field(default_factory=list)


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    limit: Optional[int] = None
    flag: bool = False
    extra: Dict[str, int] = field(default_factory=dict)
    note: str = field(default="", metadata={"json": False})


def _load(text: str, source="f.json"):
    return from_json_value(Outer, json.loads(text), Wording(), source, text)


def _error(text: str) -> str:
    with pytest.raises(UserError) as e:
        _load(text)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_nested_optional_list_and_defaults():
    cfg = _load('{"name": "a", "inner": {"scale": 2, "ids": [1, 2]}, "limit": null, "extra": {"k": 3}}')
    assert cfg == Outer(name="a", inner=Inner(scale=2.0, ids=[1, 2]), extra={"k": 3})
    assert isinstance(cfg.inner.scale, float)  # an int is a fine float, and becomes one
    assert _load('{"name": "a", "limit": 5}').limit == 5


def test_unknown_key_with_its_line_and_column():
    assert _error('{"name": "a",\n "inner": {"count": 2,\n   "cuont": 3}}') == \
        "f.json: inner.cuont: unknown key (known: count, scale, ids), line 3, column 4"
    assert "note: unknown key" in _error('{"name": "a", "note": "set by code"}')  # not a JSON key


def test_wrong_types_point_at_the_value():
    assert _error('{"name": "a", "inner": {"count": true}}') == \
        "f.json: inner.count: expected int, got bool True, line 1, column 34"  # bool is not an int
    assert _error('{"name": "a", "flag": 1}').startswith("f.json: flag: expected bool, got int 1")
    assert _error('{"name": "a",\n "inner": {"ids": [1,\n  "2"]}}') == \
        "f.json: inner.ids[1]: expected int, got str '2', line 3, column 3"
    assert _error('{"name": "a", "limit": 1.5}').startswith("f.json: limit: expected int, got float")
    assert _error('{"name": "a", "inner": []}').startswith("f.json: inner: expected an object, got list")
    assert _error('{"name": 3}').startswith("f.json: name: expected str, got int 3")
    assert _error('{"name": "a", "extra": {"k": "v"}}').startswith("f.json: extra.k: expected int")


def test_missing_key_and_top_level_not_an_object():
    assert _error('{\n "inner": {}}') == "f.json: name: required key is missing, line 1, column 1"
    assert _error("[1]").startswith("f.json: expected an object, got list")


def test_positions_of_duplicates_and_escapes():
    text = '{"a\\"b": 1, "x": [10, {"y": 2}], "x": [3]}'
    assert text[offset_of(text, ("x",))] == "[" and offset_of(text, ("x",)) == text.rindex("[")
    assert text[offset_of(text, ("x", 0))] == "3"  # the last of duplicate keys is the one json keeps
    assert offset_of(text, ("x",), at_key=True) == text.rindex('"x"')
    assert line_column("ab\ncd", 4) == (2, 2)


def test_model_json_error_names_file_key_line_column(tmp_path):
    data = Qwen2VLConfig().to_dict()
    data["text"]["num_layers"] = "28"
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(UserError) as e:
        Qwen2VLConfig.load(str(path))
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if '"num_layers": "28"' in t)
    assert str(e.value) == f"{path}: text: key 'num_layers' must be int, got '28', line {line}, column 19"


def test_data_json_error_names_file_key_line_column(tmp_path):
    with open("examples/qwen2vl/data.json") as f:
        data = json.load(f)
    data["dataset_param"]["basic_parameters"]["cutoff_len"] = True
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(DataConfigError, match=r"data.json: dataset_param.basic_parameters.cutoff_len: "
                                              r"expected int, got bool True, line \d+, column \d+$"):
        load_data_config(str(path))
    data["dataset_param"]["basic_parameters"]["cutoff_len"] = 0  # a value rule of the config class
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(DataConfigError, match=r"cutoff_len: must be >= 1, got 0, line \d+, column \d+$"):
        load_data_config(str(path))


def test_inference_json_error_names_file_key_line_column(tmp_path):
    path = tmp_path / "inference.json"
    path.write_text('{"load": "ckpt",\n "generation": {"top_k": 2,\n  "do_sample": "yes"}}')
    with pytest.raises(UserError) as e:
        parse_args(["--config", str(path), "--prompt", "hi"])
    assert str(e.value) == f"{path}: generation: 'do_sample' must be bool, got 'yes', line 3, column 16"
    path.write_text('{"load": "ckpt", "prompt": "hi"}')  # a per-run flag, not a JSON key
    with pytest.raises(UserError, match=r"unknown key 'prompt' \(known: .*\), line 1, column 18"):
        parse_args(["--config", str(path), "--prompt", "hi"])
