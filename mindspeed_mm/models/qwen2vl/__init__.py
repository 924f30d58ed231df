"""Qwen2-VL (2B / 7B / 72B): the spec the converter, training and inference use.

    config.py          Qwen2VLConfig (the model JSON), from an HF config.json
    model.py           Qwen2VLModel: one pipeline stage (ViT + projector on the first)
    vision_encoder.py  the ViT (LayerNorm, quick-GELU MLP, 2-D rotary, full attention per image)
    projector.py       the patch merger (LayerNorm + MLP over 2x2 patches)
    mapping.py         the rows of the HF <-> ours weight table

The Qwen2 language model, the layer specs and M-RoPE are shared with any family
built on the same decoder (models/language_model.py, layer_spec.py, rope_index.py).
"""
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from mindspeed_mm.models.qwen2vl.mapping import MAPPING
from mindspeed_mm.models.spec import ModelSpec

QWEN2VL = ModelSpec(
    name="qwen2_vl",
    display_name="Qwen2-VL",
    hf_architecture="Qwen2VLForConditionalGeneration",
    config_cls=Qwen2VLConfig,
    model_path="mindspeed_mm.models.qwen2vl.model:Qwen2VLModel",
    mapping=MAPPING,
)
