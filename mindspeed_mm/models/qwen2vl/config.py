"""The Qwen2-VL architecture as one plain config object (the model JSON).

``examples/qwen2vl/model_{2b,7b,72b}.json`` and a converted checkpoint's
``model.json`` hold exactly :meth:`Qwen2VLConfig.to_dict`: sizes, token ids,
dtype and freeze flags; no training hyper-parameters (those are launcher
flags).  :meth:`Qwen2VLConfig.from_hf` derives it from any Hugging Face
Qwen2-VL ``config.json`` (the hub's flat form or transformers 5's nested
``text_config`` form).
"""
import os
from dataclasses import asdict, dataclass, field
from typing import List

from mindspeed_mm.constants import DTYPES, dtype_name
from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import load_json_text, write_json_atomic
from mindspeed_mm.typed_json import Wording, from_json_value

# The model JSON's own wording of key errors ("FILE: text: unknown key 'hidden_sise'").
MODEL_JSON = Wording(unknown_key="{at_parent}unknown key '{name}'",
                     wrong_type="{at_parent}key '{name}' must be {want}, got {value}")


@dataclass
class VisionConfig:
    num_layers: int = 32  # HF: depth
    hidden_size: int = 1280  # HF: embed_dim
    num_attention_heads: int = 16
    ffn_hidden_size: int = 5120  # embed_dim * mlp_ratio
    out_hidden_size: int = 3584  # merger output = LLM hidden size (HF: hidden_size)
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    layernorm_epsilon: float = 1e-6
    activation_func: str = "quick_gelu"


@dataclass
class TextConfig:
    num_layers: int = 28
    hidden_size: int = 3584
    num_attention_heads: int = 28
    num_query_groups: int = 4  # HF: num_key_value_heads
    ffn_hidden_size: int = 18944
    vocab_size: int = 152064  # HF vocab; megatron pads it per TP (see padded_vocab_size)
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    mrope_section: List[int] = field(default_factory=lambda: [16, 24, 24])
    normalization_epsilon: float = 1e-6
    tie_word_embeddings: bool = False  # 2B ties, 7B/72B do not
    make_vocab_size_divisible_by: int = 128

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Megatron's padded vocabulary: a multiple of divisible_by * TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple


def hf_text_and_tokens(hf: dict, text: dict, max_positions: int) -> dict:
    """The Qwen2 LLM part of an HF config (``text``: the top level updated with its text_config), the
    vision token ids and the dtype, as keyword arguments of a family's config class: the same for every
    family on this decoder.  ``max_positions``: the family's default max_position_embeddings."""
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    return dict(
        text=TextConfig(
            num_layers=text["num_hidden_layers"], hidden_size=text["hidden_size"],
            num_attention_heads=text["num_attention_heads"],
            num_query_groups=text.get("num_key_value_heads", text["num_attention_heads"]),
            ffn_hidden_size=text["intermediate_size"], vocab_size=text["vocab_size"],
            max_position_embeddings=text.get("max_position_embeddings", max_positions),
            rope_theta=float(text.get("rope_theta", rope.get("rope_theta", 1000000.0))),
            mrope_section=list(rope.get("mrope_section", [16, 24, 24])),
            normalization_epsilon=text.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        ),
        image_token_id=hf.get("image_token_id", text.get("image_token_id", 151655)),
        video_token_id=hf.get("video_token_id", text.get("video_token_id", 151656)),
        vision_start_token_id=hf.get("vision_start_token_id", text.get("vision_start_token_id", 151652)),
        vision_end_token_id=hf.get("vision_end_token_id", text.get("vision_end_token_id", 151653)),
        dtype=_hf_dtype(hf.get("torch_dtype") or hf.get("dtype") or text.get("dtype")),
    )


@dataclass
class Qwen2VLConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    dtype: str = "bf16"
    freeze_vision_encoder: bool = False
    freeze_vision_projector: bool = False
    freeze_language_model: bool = False

    # ---- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config", text: str = None) -> "Qwen2VLConfig":
        """The model JSON (parsed); ``text``, the file's JSON, adds the line and column to key errors."""
        cfg = from_json_value(cls, data, MODEL_JSON, source, text)
        cfg.validate(source)
        return cfg

    @classmethod
    def load(cls, path: str) -> "Qwen2VLConfig":
        """A model JSON file, or a directory holding model.json (converted checkpoint)."""
        if os.path.isdir(path):
            path = os.path.join(path, "model.json")
        data, text = load_json_text(path)
        if isinstance(data, dict) and ("vision_config" in data or "model_type" in data):
            return cls.from_hf(data, source=path)  # an HF config.json given by mistake is fine
        return cls.from_dict(data, source=path, text=text)

    def save(self, path: str, sync: bool = True) -> None:
        write_json_atomic(path, self.to_dict(), indent=2, sync=sync)

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "Qwen2VLConfig":
        """From an HF Qwen2-VL config dict (flat hub form or nested text_config form)."""
        if not isinstance(hf, dict):
            raise UserError(f"{source}: not a JSON object")
        model_type = hf.get("model_type")
        if model_type not in ("qwen2_vl", None) or "vision_config" not in hf:
            raise UserError(f"{source}: not a Qwen2-VL config (model_type={model_type!r}, "
                            f"needs model_type 'qwen2_vl' and a vision_config)")
        text = dict(hf)
        text.update(hf.get("text_config") or {})
        vis = hf["vision_config"]
        try:
            cfg = cls(
                vision=VisionConfig(
                    num_layers=vis["depth"], hidden_size=vis["embed_dim"],
                    num_attention_heads=vis["num_heads"],
                    ffn_hidden_size=int(vis["embed_dim"] * vis.get("mlp_ratio", 4)),
                    out_hidden_size=vis.get("hidden_size", text["hidden_size"]),
                    patch_size=vis.get("patch_size", 14),
                    temporal_patch_size=vis.get("temporal_patch_size", 2),
                    spatial_merge_size=vis.get("spatial_merge_size", 2),
                    in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
                    activation_func=vis.get("hidden_act", "quick_gelu"),
                ),
                **hf_text_and_tokens(hf, text, max_positions=32768),
            )
        except KeyError as exc:
            raise UserError(f"{source}: missing key {exc.args[0]!r} in a Qwen2-VL config") from None
        cfg.validate(source)
        return cfg

    # ---- checks ------------------------------------------------------------
    def validate(self, source: str = "model config") -> None:
        t, v = self.text, self.vision
        if self.dtype not in DTYPES:
            raise UserError(f"{source}: dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if t.hidden_size % t.num_attention_heads:
            raise UserError(f"{source}: text.hidden_size {t.hidden_size} not divisible by "
                            f"num_attention_heads {t.num_attention_heads}")
        if t.num_attention_heads % t.num_query_groups:
            raise UserError(f"{source}: text.num_attention_heads {t.num_attention_heads} not divisible by "
                            f"num_query_groups {t.num_query_groups}")
        if 2 * sum(t.mrope_section) != t.kv_channels:
            raise UserError(f"{source}: text.mrope_section {t.mrope_section} must sum to head_dim/2 = "
                            f"{t.kv_channels // 2}")
        if v.hidden_size % v.num_attention_heads:
            raise UserError(f"{source}: vision.hidden_size {v.hidden_size} not divisible by "
                            f"num_attention_heads {v.num_attention_heads}")
        if v.out_hidden_size != t.hidden_size:
            raise UserError(f"{source}: vision.out_hidden_size {v.out_hidden_size} must equal "
                            f"text.hidden_size {t.hidden_size}")

    def check_parallel(self, tensor_parallel: int) -> None:
        """TP must split heads, query groups and the MLP evenly."""
        t, v = self.text, self.vision
        for name, value in (("text.num_attention_heads", t.num_attention_heads),
                            ("text.num_query_groups", t.num_query_groups),
                            ("text.ffn_hidden_size", t.ffn_hidden_size),
                            ("vision.num_attention_heads", v.num_attention_heads),
                            ("vision.ffn_hidden_size", v.ffn_hidden_size)):
            if value % tensor_parallel:
                raise UserError(f"tensor parallel size {tensor_parallel} does not divide {name} = {value}")


def _hf_dtype(name) -> str:
    return dtype_name(name, "bf16")

