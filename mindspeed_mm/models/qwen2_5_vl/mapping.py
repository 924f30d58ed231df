"""Qwen2.5-VL's rows of the weight mapping table: HF hub names <-> ours, split kind, full shape.

Hub names are those of the Qwen2.5-VL checkpoints on the hub (``visual.blocks.N.mlp.gate_proj.weight``,
``visual.merger.ln_q.weight``, ``model.layers.N...``); transformers 5's internal names
(``model.visual.*``, ``model.language_model.*``) are read too (models/mapping.hub_key).  The LLM, the
embedding and the head are the Qwen2 decoder's rows (models/qwen2vl/mapping.py); the ViT differs from
Qwen2-VL's by its RMSNorms (weight only) and its gated MLP: HF's gate_proj / up_proj (with biases) are
megatron's one ``linear_fc1`` ([gate; up], split per TP rank as the LLM's), down_proj its ``linear_fc2``.
"""
from __future__ import annotations

from typing import Tuple

from mindspeed_mm.models.mapping import (COLUMN, COPY, GATE_UP, GATED_COLUMN, REPLICATED, ROW, MappingTable,
                                         Param)
from mindspeed_mm.models.qwen2vl.mapping import (PATCH_EMBED, VISION_LAYER, embedding_rows, head_rows, text_rows,
                                                 vision_attention_rows)


def _v(cfg):
    return cfg.vision


def _merged(cfg):  # projector width: spatial_merge_size**2 ViT tokens concatenated
    return cfg.vision.hidden_size * cfg.vision.spatial_merge_size ** 2


def _vision_head_rows():
    return [
        Param("vision_encoder.patch_embed.weight", ("visual.patch_embed.proj.weight",), PATCH_EMBED, REPLICATED,
              lambda c: (_v(c).hidden_size,
                         _v(c).in_channels * _v(c).temporal_patch_size * _v(c).patch_size ** 2)),
    ]


def _vision_rows():
    vis = "visual.blocks.{i}."
    return [
        Param(VISION_LAYER + "input_layernorm.weight", (vis + "norm1.weight",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
        *vision_attention_rows(vis),
        Param(VISION_LAYER + "pre_mlp_layernorm.weight", (vis + "norm2.weight",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
        Param(VISION_LAYER + "mlp.linear_fc1.weight", (vis + "mlp.gate_proj.weight", vis + "mlp.up_proj.weight"),
              GATE_UP, GATED_COLUMN, lambda c: (2 * _v(c).ffn_hidden_size, _v(c).hidden_size), "vision"),
        Param(VISION_LAYER + "mlp.linear_fc1.bias", (vis + "mlp.gate_proj.bias", vis + "mlp.up_proj.bias"),
              GATE_UP, GATED_COLUMN, lambda c: (2 * _v(c).ffn_hidden_size,), "vision"),
        Param(VISION_LAYER + "mlp.linear_fc2.weight", (vis + "mlp.down_proj.weight",), COPY, ROW,
              lambda c: (_v(c).hidden_size, _v(c).ffn_hidden_size), "vision"),
        Param(VISION_LAYER + "mlp.linear_fc2.bias", (vis + "mlp.down_proj.bias",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
    ]


def _projector_rows():  # patch merger: RMSNorm ln_q on ViT width, then an MLP over merge**2 concatenated tokens
    return [
        Param("vision_projector.layernorm.weight", ("visual.merger.ln_q.weight",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,)),
        Param("vision_projector.linear_fc1.weight", ("visual.merger.mlp.0.weight",), COPY, COLUMN,
              lambda c: (_merged(c), _merged(c))),
        Param("vision_projector.linear_fc1.bias", ("visual.merger.mlp.0.bias",), COPY, COLUMN,
              lambda c: (_merged(c),)),
        Param("vision_projector.linear_fc2.weight", ("visual.merger.mlp.2.weight",), COPY, ROW,
              lambda c: (_v(c).out_hidden_size, _merged(c))),
        Param("vision_projector.linear_fc2.bias", ("visual.merger.mlp.2.bias",), COPY, REPLICATED,
              lambda c: (_v(c).out_hidden_size,)),
    ]


ROWS: Tuple[Param, ...] = tuple(_vision_head_rows() + _vision_rows() + _projector_rows() + embedding_rows()
                                 + text_rows() + head_rows())

MAPPING = MappingTable("Qwen2.5-VL", ROWS)
