import copy
import json
import os

import pytest

from mindspeed_mm.data.config import DataConfigError, data_config_from_dict, load_data_config
from mindspeed_mm.jsonio import DataFileError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "qwen2vl", "data.json")


def _example():
    with open(EXAMPLE) as f:
        return json.load(f)


def test_example_data_json_loads():
    cfg = load_data_config(EXAMPLE)
    bp = cfg.dataset_param.basic_parameters
    assert cfg.dataset_param.dataset_type == "huggingface" and bp.template == "qwen2vl"
    assert bp.dataset_files() == ["./data/mllm_format_llava_instruct_data.json"]
    assert cfg.dataset_param.attr.user_tag == "user"


def test_several_datasets_comma_separated():
    d = _example()
    d["dataset_param"]["basic_parameters"]["dataset"] = "a.json, b.json,"
    assert data_config_from_dict(d).dataset_param.basic_parameters.dataset_files() == ["a.json", "b.json"]


@pytest.mark.parametrize("path, value, message", [
    (("dataset_param", "basic_parameters", "cutof_len"), 10,
     "dataset_param.basic_parameters.cutof_len: unknown key"),
    (("dataset_param", "basic_parameters", "cutoff_len"), "2048",
     "dataset_param.basic_parameters.cutoff_len: expected int, got str"),
    (("dataset_param", "basic_parameters", "cutoff_len"), True,
     "dataset_param.basic_parameters.cutoff_len: expected int, got bool"),
    (("dataset_param", "basic_parameters", "train_on_prompt"), 1,
     "dataset_param.basic_parameters.train_on_prompt: expected bool"),
    (("dataset_param", "attr", "images"), None, "dataset_param.attr.images: expected str"),
    (("dataloader_param", "collate_param"), [], "dataloader_param.collate_param: expected an object"),
    (("dataloader_param", "batch_size"), 0, "dataloader_param.batch_size: must be >= 1"),
    (("dataset_param", "dataset_type"), "mindrecord", "dataset_param.dataset_type: only 'huggingface'"),
    (("dataset_param", "basic_parameters", "template"), "llava", "template: only 'qwen2vl'"),
])
def test_bad_values_name_the_key(path, value, message):
    d = copy.deepcopy(_example())
    node = d
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(DataConfigError) as e:
        data_config_from_dict(d)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_required_key():
    d = _example()
    del d["dataset_param"]["preprocess_parameters"]["model_name_or_path"]
    with pytest.raises(DataConfigError, match="preprocess_parameters.model_name_or_path: required"):
        data_config_from_dict(d)


def test_max_samples_optional():
    d = _example()
    d["dataset_param"]["basic_parameters"]["max_samples"] = 10
    assert data_config_from_dict(d).dataset_param.basic_parameters.max_samples == 10


def test_malformed_file_gives_line_and_column(tmp_path):
    p = tmp_path / "data.json"
    p.write_text('{\n  "dataset_param": {\n    "dataset_type": "huggingface",,\n  }\n}')
    with pytest.raises(DataFileError, match=r"data.json: line 3, column 35: invalid JSON"):
        load_data_config(str(p))


def test_file_error_prefixes_path(tmp_path):
    p = tmp_path / "data.json"
    d = _example()
    d["extra"] = 1
    p.write_text(json.dumps(d))
    with pytest.raises(DataConfigError, match=r"data.json: extra: unknown key"):
        load_data_config(str(p))
