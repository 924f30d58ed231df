"""The Qwen2.5-VL architecture as one plain config object (the model JSON).

The same shape as Qwen2-VL's (models/qwen2vl/config.py), whose text part (the Qwen2 decoder) it shares;
the vision part adds window attention (``window_size``, ``fullatt_block_indexes``) and absolute video
time (``tokens_per_second``) and uses RMSNorm and a gated SiLU MLP (``ffn_hidden_size`` is each of
gate / up).  The model JSON names its family: ``"model_type": "qwen2_5_vl"`` (a model JSON without
``model_type`` is Qwen2-VL's, see models/__init__.load_model_config).

:meth:`Qwen2_5_VLConfig.from_hf` reads any HF Qwen2.5-VL ``config.json`` (the hub's flat form, whose
``vision_config`` says ``hidden_size`` for the ViT width and ``out_hidden_size`` for the LLM's, or
transformers 5's nested ``text_config`` form).
"""
import os
from dataclasses import asdict, dataclass, field
from typing import List

from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import load_json_text
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig, hf_text_and_tokens

MODEL_TYPE = "qwen2_5_vl"


@dataclass
class Qwen2_5_VisionConfig(VisionConfig):
    ffn_hidden_size: int = 3420  # HF: intermediate_size (gate and up each)
    activation_func: str = "silu"
    layernorm_epsilon: float = 1e-6  # the ViT's RMSNorm epsilon (HF hard-codes 1e-6)
    window_size: int = 112  # pixels per window side: window_size / patch_size / merge merged tokens
    fullatt_block_indexes: List[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: int = 2  # M-RoPE temporal positions per second of video

    @property
    def window_merge_units(self) -> int:
        """Merged tokens (merge x merge patches) per window side."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass
class Qwen2_5_VLConfig(Qwen2VLConfig):
    vision: Qwen2_5_VisionConfig = field(default_factory=Qwen2_5_VisionConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(max_position_embeddings=128000))
    model_type: str = MODEL_TYPE

    # ---- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        data = asdict(self)
        return {"model_type": data.pop("model_type"), **data}  # the family first, for readers of the file

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config", text: str = None) -> "Qwen2_5_VLConfig":
        if isinstance(data, dict) and data.get("model_type") != MODEL_TYPE:
            found = data.get("model_type")
            what = f"model_type {found!r}" if found is not None else "no model_type (a Qwen2-VL model JSON)"
            raise UserError(f"{source}: not a Qwen2.5-VL model JSON: it has {what}, needs "
                            f"\"model_type\": \"{MODEL_TYPE}\"")
        return super().from_dict(data, source, text)

    @classmethod
    def load(cls, path: str) -> "Qwen2_5_VLConfig":
        """A model JSON file, or a directory holding model.json (converted checkpoint); an HF config.json
        (it has a vision_config) is read with :meth:`from_hf`."""
        if os.path.isdir(path):
            path = os.path.join(path, "model.json")
        data, text = load_json_text(path)
        if isinstance(data, dict) and "vision_config" in data:
            return cls.from_hf(data, source=path)
        return cls.from_dict(data, source=path, text=text)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Qwen2_5_VLConfig":
        """From an HF Qwen2.5-VL config dict (flat hub form or nested text_config form)."""
        if not isinstance(hf, dict):
            raise UserError(f"{source}: not a JSON object")
        model_type = hf.get("model_type")
        if model_type != MODEL_TYPE or not isinstance(hf.get("vision_config"), dict):
            raise UserError(f"{source}: not a Qwen2.5-VL config (model_type={model_type!r}, "
                            f"needs model_type '{MODEL_TYPE}' and a vision_config)")
        text = dict(hf)
        text.update(hf.get("text_config") or {})
        vis = hf["vision_config"]
        try:
            cfg = cls(
                vision=Qwen2_5_VisionConfig(
                    num_layers=vis["depth"], hidden_size=vis["hidden_size"],
                    num_attention_heads=vis["num_heads"], ffn_hidden_size=vis["intermediate_size"],
                    out_hidden_size=vis.get("out_hidden_size", text["hidden_size"]),
                    patch_size=vis.get("patch_size", 14),
                    temporal_patch_size=vis.get("temporal_patch_size", 2),
                    spatial_merge_size=vis.get("spatial_merge_size", 2),
                    in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
                    activation_func=vis.get("hidden_act", "silu"),
                    window_size=vis.get("window_size", 112),
                    fullatt_block_indexes=[int(i) for i in vis.get("fullatt_block_indexes", [7, 15, 23, 31])],
                    tokens_per_second=vis.get("tokens_per_second", 2),
                ),
                **hf_text_and_tokens(hf, text, max_positions=128000),
            )
        except KeyError as exc:
            raise UserError(f"{source}: missing key {exc.args[0]!r} in a Qwen2.5-VL config") from None
        cfg.validate(source)
        return cfg

    # ---- checks ------------------------------------------------------------
    def validate(self, source: str = "model config") -> None:
        super().validate(source)
        v = self.vision
        if self.model_type != MODEL_TYPE:
            raise UserError(f"{source}: model_type must be {MODEL_TYPE!r}, got {self.model_type!r}")
        if v.activation_func != "silu":
            raise UserError(f"{source}: vision.activation_func must be 'silu' (Qwen2.5-VL's gated MLP), "
                            f"got {v.activation_func!r}")
        if v.window_merge_units < 1:
            raise UserError(f"{source}: vision.window_size {v.window_size} is smaller than one merged token "
                            f"(patch_size * spatial_merge_size = {v.patch_size * v.spatial_merge_size})")
        bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.num_layers]
        if bad:
            raise UserError(f"{source}: vision.fullatt_block_indexes {v.fullatt_block_indexes}: {bad} not in "
                            f"0..{v.num_layers - 1} (vision.num_layers = {v.num_layers})")
        if not v.tokens_per_second > 0:
            raise UserError(f"{source}: vision.tokens_per_second must be > 0, got {v.tokens_per_second}")
