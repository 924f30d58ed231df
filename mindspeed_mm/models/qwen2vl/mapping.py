"""Qwen2-VL's rows of the weight mapping table: HF hub names <-> ours, split kind, full shape.

The table machinery (expansion per config, key checks, lazy views) is
``mindspeed_mm/models/mapping.py``; the LLM rows (:func:`text_rows` and the
embedding / head rows) are the Qwen2 decoder's and serve any family built on it.
"""
from __future__ import annotations

from typing import Tuple

from mindspeed_mm.models.mapping import (COLUMN, COPY, EMBEDDING, FINAL_NORM, GATE_UP, GATED_COLUMN, HF_LM_HEAD,
                                         OUTPUT_LAYER, PADDED_VOCAB, REPLICATED, ROW, TEXT_LAYER, VOCAB,
                                         MappingTable, Param, Transform, cat)

VISION_LAYER = "vision_encoder.blocks.layers.{i}."


# ---- transforms: HF tensors (in the row's hf order) <-> our tensor -------------------------

def _text_qkv_to_ours(ts, cfg):
    # q [nh*hd, ...], k/v [ng*hd, ...] -> per query group [q heads of g; k_g; v_g] (megatron GQA).
    q, k, v = ts
    ng = cfg.text.num_query_groups
    return cat([t.reshape(ng, -1, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(-1, *q.shape[1:])


def _text_qkv_to_hf(t, cfg):
    ng, nh, hd = cfg.text.num_query_groups, cfg.text.num_attention_heads, cfg.text.kv_channels
    grouped = t.reshape(ng, (nh // ng + 2) * hd, *t.shape[1:])
    q, k, v = grouped.split([nh // ng * hd, hd, hd], dim=1)
    return [x.reshape(-1, *t.shape[1:]) for x in (q, k, v)]


def _vision_qkv_to_ours(ts, cfg):
    # HF rows [3, heads, hd] -> megatron [heads, 3, hd] (every head is its own query group).
    (t,) = ts
    heads = cfg.vision.num_attention_heads
    return t.reshape(3, heads, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _vision_qkv_to_hf(t, cfg):
    heads = cfg.vision.num_attention_heads
    return [t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]


def _patch_embed_to_hf(t, cfg):
    v = cfg.vision  # Conv3d weight [embed, in_ch, t, p, p]; ours computes it as a Linear on flat patches
    return [t.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)]

TEXT_QKV = Transform("text_qkv", _text_qkv_to_ours, _text_qkv_to_hf)
VISION_QKV = Transform("vision_qkv", _vision_qkv_to_ours, _vision_qkv_to_hf)
PATCH_EMBED = Transform("patch_embed", lambda ts, cfg: ts[0].reshape(ts[0].shape[0], -1), _patch_embed_to_hf)


# ---- the rows -------------------------------------------------------------------------------

def _v(cfg):
    return cfg.vision


def _t(cfg):
    return cfg.text


def _merged(cfg):  # projector width: spatial_merge_size**2 ViT tokens concatenated
    return cfg.vision.hidden_size * cfg.vision.spatial_merge_size ** 2


def _qkv_rows(cfg):
    t = cfg.text
    return (t.num_attention_heads + 2 * t.num_query_groups) * t.kv_channels


def vision_attention_rows(vis: str):
    """A ViT block's attention (fused qkv with bias, proj with bias): the same in every Qwen-VL family;
    ``vis`` is the HF block prefix."""
    return [
        Param(VISION_LAYER + "self_attention.linear_qkv.weight", (vis + "attn.qkv.weight",), VISION_QKV, COLUMN,
              lambda c: (3 * _v(c).hidden_size, _v(c).hidden_size), "vision"),
        Param(VISION_LAYER + "self_attention.linear_qkv.bias", (vis + "attn.qkv.bias",), VISION_QKV, COLUMN,
              lambda c: (3 * _v(c).hidden_size,), "vision"),
        Param(VISION_LAYER + "self_attention.linear_proj.weight", (vis + "attn.proj.weight",), COPY, ROW,
              lambda c: (_v(c).hidden_size, _v(c).hidden_size), "vision"),
        Param(VISION_LAYER + "self_attention.linear_proj.bias", (vis + "attn.proj.bias",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
    ]


def _vision_rows():
    vis = "visual.blocks.{i}."
    return [
        Param(VISION_LAYER + "input_layernorm.weight", (vis + "norm1.weight",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
        Param(VISION_LAYER + "input_layernorm.bias", (vis + "norm1.bias",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
        *vision_attention_rows(vis),
        Param(VISION_LAYER + "pre_mlp_layernorm.weight", (vis + "norm2.weight",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
        Param(VISION_LAYER + "pre_mlp_layernorm.bias", (vis + "norm2.bias",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
        Param(VISION_LAYER + "mlp.linear_fc1.weight", (vis + "mlp.fc1.weight",), COPY, COLUMN,
              lambda c: (_v(c).ffn_hidden_size, _v(c).hidden_size), "vision"),
        Param(VISION_LAYER + "mlp.linear_fc1.bias", (vis + "mlp.fc1.bias",), COPY, COLUMN,
              lambda c: (_v(c).ffn_hidden_size,), "vision"),
        Param(VISION_LAYER + "mlp.linear_fc2.weight", (vis + "mlp.fc2.weight",), COPY, ROW,
              lambda c: (_v(c).hidden_size, _v(c).ffn_hidden_size), "vision"),
        Param(VISION_LAYER + "mlp.linear_fc2.bias", (vis + "mlp.fc2.bias",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
    ]


def text_rows():
    llm, attn = "model.layers.{i}.", "model.layers.{i}.self_attn."
    return [
        Param(TEXT_LAYER + "input_layernorm.weight", (llm + "input_layernorm.weight",), COPY, REPLICATED,
              lambda c: (_t(c).hidden_size,), "text"),
        Param(TEXT_LAYER + "self_attention.linear_qkv.weight",
              (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), TEXT_QKV, COLUMN,
              lambda c: (_qkv_rows(c), _t(c).hidden_size), "text"),
        Param(TEXT_LAYER + "self_attention.linear_qkv.bias",
              (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"), TEXT_QKV, COLUMN,
              lambda c: (_qkv_rows(c),), "text"),
        Param(TEXT_LAYER + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), COPY, ROW,
              lambda c: (_t(c).hidden_size, _t(c).num_attention_heads * _t(c).kv_channels), "text"),
        Param(TEXT_LAYER + "pre_mlp_layernorm.weight", (llm + "post_attention_layernorm.weight",), COPY,
              REPLICATED, lambda c: (_t(c).hidden_size,), "text"),
        Param(TEXT_LAYER + "mlp.linear_fc1.weight", (llm + "mlp.gate_proj.weight", llm + "mlp.up_proj.weight"),
              GATE_UP, GATED_COLUMN, lambda c: (2 * _t(c).ffn_hidden_size, _t(c).hidden_size), "text"),
        Param(TEXT_LAYER + "mlp.linear_fc2.weight", (llm + "mlp.down_proj.weight",), COPY, ROW,
              lambda c: (_t(c).hidden_size, _t(c).ffn_hidden_size), "text"),
    ]


def _vision_head_rows():  # patch embedding before the ViT blocks
    return [
        Param("vision_encoder.patch_embed.weight", ("visual.patch_embed.proj.weight",), PATCH_EMBED, REPLICATED,
              lambda c: (_v(c).hidden_size,
                         _v(c).in_channels * _v(c).temporal_patch_size * _v(c).patch_size ** 2)),
    ]


def _projector_rows():  # patch merger: ln_q on ViT width, then an MLP over merge**2 concatenated tokens
    return [
        Param("vision_projector.layernorm.weight", ("visual.merger.ln_q.weight",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,)),
        Param("vision_projector.layernorm.bias", ("visual.merger.ln_q.bias",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,)),
        Param("vision_projector.linear_fc1.weight", ("visual.merger.mlp.0.weight",), COPY, COLUMN,
              lambda c: (_merged(c), _merged(c))),
        Param("vision_projector.linear_fc1.bias", ("visual.merger.mlp.0.bias",), COPY, COLUMN,
              lambda c: (_merged(c),)),
        Param("vision_projector.linear_fc2.weight", ("visual.merger.mlp.2.weight",), COPY, ROW,
              lambda c: (_t(c).hidden_size, _merged(c))),
        Param("vision_projector.linear_fc2.bias", ("visual.merger.mlp.2.bias",), COPY, REPLICATED,
              lambda c: (_t(c).hidden_size,)),
    ]


def embedding_rows():
    return [
        Param(EMBEDDING, ("model.embed_tokens.weight",), PADDED_VOCAB, VOCAB,
              lambda c: (_t(c).padded_vocab_size(1), _t(c).hidden_size)),
    ]


def head_rows():  # last pipeline stage: final norm and output layer
    return [
        Param(FINAL_NORM + "weight", ("model.norm.weight",), COPY, REPLICATED,
              lambda c: (_t(c).hidden_size,)),
        Param(OUTPUT_LAYER, (HF_LM_HEAD,), PADDED_VOCAB, VOCAB,
              lambda c: (_t(c).padded_vocab_size(1), _t(c).hidden_size)),
    ]


ROWS: Tuple[Param, ...] = tuple(_vision_head_rows() + _vision_rows() + _projector_rows() + embedding_rows()
                                 + text_rows() + head_rows())

MAPPING = MappingTable("Qwen2-VL", ROWS)
