"""Model families, one spec each (models/spec.py), looked up by HF ``model_type`` or by config.

Adding a family: a folder beside ``qwen2vl/`` with its config, modules and mapping
rows, and one line in :data:`SPECS`.
"""
import json
import os

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.qwen2_5_vl import QWEN2_5_VL
from mindspeed_mm.models.qwen2vl import QWEN2VL
from mindspeed_mm.models.spec import ModelSpec

SPECS = {spec.name: spec for spec in (QWEN2VL, QWEN2_5_VL)}


def get_spec(model_type: str = "qwen2_vl") -> ModelSpec:
    """The spec of an HF ``model_type``; one line naming the known ones otherwise."""
    try:
        return SPECS[model_type]
    except KeyError:
        raise UserError(f"model_type {model_type!r} is not supported (known: {', '.join(sorted(SPECS))})") from None


def spec_of(cfg) -> ModelSpec:
    """The spec whose config class built ``cfg`` (the most derived one: Qwen2.5-VL's config class extends
    Qwen2-VL's)."""
    matches = [spec for spec in SPECS.values() if isinstance(cfg, spec.config_cls)]
    if matches:
        return max(matches, key=lambda spec: len(spec.config_cls.__mro__))
    raise TypeError(f"no model spec for config type {type(cfg).__name__}")


def spec_for_hf_config(hf_config: dict) -> ModelSpec:
    """The spec for an HF ``config.json`` by its ``model_type``; an unknown one goes to Qwen2-VL's reader,
    whose one-line error names what it found."""
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    return SPECS.get(model_type, QWEN2VL)


def load_model_config(path: str):
    """A model JSON, a converted checkpoint's folder (its model.json) or an HF config.json, read by its
    family's config class, picked by the file's ``model_type`` (HF's, or our model.json's).  A model.json
    without ``model_type`` is Qwen2-VL's (written before families had names); a file that cannot be read
    goes to Qwen2-VL's reader too, whose one-line error names the problem."""
    file = os.path.join(path, "model.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = None
    return spec_for_hf_config(data).config_cls.load(path)
