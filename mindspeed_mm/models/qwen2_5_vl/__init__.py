"""Qwen2.5-VL (3B / 7B / 32B / 72B): the spec the converter, training and inference use.

    config.py          Qwen2_5_VLConfig (the model JSON, "model_type": "qwen2_5_vl"), from an HF config.json
    model.py           Qwen2_5_VLModel: Qwen2VLModel with this family's ViT, merger, table and video time
    vision_encoder.py  the ViT (RMSNorm, gated SiLU MLP, 2-D rotary, window attention but in fullatt blocks)
    projector.py       the patch merger (RMSNorm + MLP over 2x2 patches)
    mapping.py         the rows of the HF <-> ours weight table

The Qwen2 language model, the layer specs and M-RoPE are shared with Qwen2-VL (models/language_model.py,
layer_spec.py, rope_index.py with ``tokens_per_second``), and so are the sharding and the pipeline rule.
"""
from mindspeed_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mindspeed_mm.models.qwen2_5_vl.mapping import MAPPING
from mindspeed_mm.models.spec import ModelSpec

QWEN2_5_VL = ModelSpec(
    name="qwen2_5_vl",
    display_name="Qwen2.5-VL",
    hf_architecture="Qwen2_5_VLForConditionalGeneration",
    config_cls=Qwen2_5_VLConfig,
    model_path="mindspeed_mm.models.qwen2_5_vl.model:Qwen2_5_VLModel",
    mapping=MAPPING,
)
