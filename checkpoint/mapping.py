"""The one table between Hugging Face Qwen2-VL parameter names and ours.

Every parameter of our model (full, TP=1, global layer indices) is one
:class:`Param` row: our name, the hub-layout HF name(s) it is made of, the
transform between the two, how tensor parallelism splits it, and its full
shape as a function of the model config.  Both directions and the model
loader are driven by :data:`TABLE`; nothing else knows a parameter name.

Lazy views (:class:`HFToOurs`, :class:`OursToHF`) build one tensor at a time
from a source mapping, so a conversion never holds more than what it writes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.config import Qwen2VLConfig

# How tensor parallelism splits a parameter (see checkpoint/parallel.py).
REPLICATED = "replicated"      # every rank holds all of it (norms, row-parallel biases, patch embed)
COLUMN = "column"              # dim 0 in TP contiguous pieces (qkv is already grouped so this is per group)
ROW = "row"                    # dim 1 in TP contiguous pieces
GATED_COLUMN = "gated_column"  # [gate; up] on dim 0: each rank holds [gate_r; up_r]
VOCAB = "vocab"                # dim 0 after padding the vocabulary to a multiple of divisible_by * TP
SPLITS = (REPLICATED, COLUMN, ROW, GATED_COLUMN, VOCAB)

VISION_LAYER = "vision_encoder.blocks.layers.{i}."
TEXT_LAYER = "language_model.decoder.layers.{i}."
EMBEDDING = "language_model.embedding.word_embeddings.weight"
OUTPUT_LAYER = "language_model.output_layer.weight"
HF_LM_HEAD = "lm_head.weight"


# ---- transforms: HF tensors (in the row's hf order) <-> our tensor -------------------------

@dataclass(frozen=True)
class Transform:
    name: str
    to_ours: Callable[[List[torch.Tensor], Qwen2VLConfig], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Qwen2VLConfig], List[torch.Tensor]]


def _text_qkv_to_ours(ts, cfg):
    # q [nh*hd, ...], k/v [ng*hd, ...] -> per query group [q heads of g; k_g; v_g] (megatron GQA).
    q, k, v = ts
    ng = cfg.text.num_query_groups
    return torch.cat([t.reshape(ng, -1, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(-1, *q.shape[1:])


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


def _vocab_to_ours(ts, cfg):
    return pad_vocab(ts[0], cfg.text.padded_vocab_size(1), cfg)


def _vocab_to_hf(t, cfg):
    return [t[:cfg.text.vocab_size]]


COPY = Transform("copy", lambda ts, cfg: ts[0], lambda t, cfg: [t])
TEXT_QKV = Transform("text_qkv", _text_qkv_to_ours, _text_qkv_to_hf)
VISION_QKV = Transform("vision_qkv", _vision_qkv_to_ours, _vision_qkv_to_hf)
GATE_UP = Transform("gate_up", lambda ts, cfg: torch.cat(ts, dim=0), lambda t, cfg: list(t.chunk(2, dim=0)))
PATCH_EMBED = Transform("patch_embed", lambda ts, cfg: ts[0].reshape(ts[0].shape[0], -1), _patch_embed_to_hf)
PADDED_VOCAB = Transform("padded_vocab", _vocab_to_ours, _vocab_to_hf)


def pad_vocab(t: torch.Tensor, rows: int, cfg: Qwen2VLConfig) -> torch.Tensor:
    """Keep the real vocabulary rows of ``t`` [>=vocab, h] and zero-pad to ``rows``."""
    t = t[:cfg.text.vocab_size]
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


# ---- the table ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    ours: str                   # our name; "{i}" is the layer index when layers != ""
    hf: Tuple[str, ...]         # hub-layout HF names, in the order the transform takes them
    transform: Transform
    split: str                  # one of SPLITS
    shape: Callable[[Qwen2VLConfig], Tuple[int, ...]]  # our full (TP=1) shape
    layers: str = ""            # "vision" / "text": the row repeats per layer


def _v(cfg):
    return cfg.vision


def _t(cfg):
    return cfg.text


def _merged(cfg):  # projector width: spatial_merge_size**2 ViT tokens concatenated
    return cfg.vision.hidden_size * cfg.vision.spatial_merge_size ** 2


def _qkv_rows(cfg):
    t = cfg.text
    return (t.num_attention_heads + 2 * t.num_query_groups) * t.kv_channels


def _vision_rows():
    vis = "visual.blocks.{i}."
    return [
        Param(VISION_LAYER + "input_layernorm.weight", (vis + "norm1.weight",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
        Param(VISION_LAYER + "input_layernorm.bias", (vis + "norm1.bias",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
        Param(VISION_LAYER + "self_attention.linear_qkv.weight", (vis + "attn.qkv.weight",), VISION_QKV, COLUMN,
              lambda c: (3 * _v(c).hidden_size, _v(c).hidden_size), "vision"),
        Param(VISION_LAYER + "self_attention.linear_qkv.bias", (vis + "attn.qkv.bias",), VISION_QKV, COLUMN,
              lambda c: (3 * _v(c).hidden_size,), "vision"),
        Param(VISION_LAYER + "self_attention.linear_proj.weight", (vis + "attn.proj.weight",), COPY, ROW,
              lambda c: (_v(c).hidden_size, _v(c).hidden_size), "vision"),
        Param(VISION_LAYER + "self_attention.linear_proj.bias", (vis + "attn.proj.bias",), COPY, REPLICATED,
              lambda c: (_v(c).hidden_size,), "vision"),
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


def _text_rows():
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


def _embedding_rows():
    return [
        Param(EMBEDDING, ("model.embed_tokens.weight",), PADDED_VOCAB, VOCAB,
              lambda c: (_t(c).padded_vocab_size(1), _t(c).hidden_size)),
    ]


def _head_rows():  # last pipeline stage: final norm and output layer
    return [
        Param("language_model.decoder.final_layernorm.weight", ("model.norm.weight",), COPY, REPLICATED,
              lambda c: (_t(c).hidden_size,)),
        Param(OUTPUT_LAYER, (HF_LM_HEAD,), PADDED_VOCAB, VOCAB,
              lambda c: (_t(c).padded_vocab_size(1), _t(c).hidden_size)),
    ]


TABLE: Tuple[Param, ...] = tuple(_vision_head_rows() + _vision_rows() + _projector_rows() + _embedding_rows()
                                 + _text_rows() + _head_rows())


# ---- the table expanded for one config ------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One row of :data:`TABLE` with its layer index filled in."""
    ours: str
    hf: Tuple[str, ...]
    param: Param

    @property
    def split(self) -> str:
        return self.param.split


def entries(cfg: Qwen2VLConfig) -> List[Entry]:
    """Every parameter of the full model for ``cfg``, in model order.

    Tied embeddings (2B) have no output layer: HF has no (or an ignored) lm_head.
    """
    out = []
    for p in TABLE:
        if p.ours == OUTPUT_LAYER and cfg.text.tie_word_embeddings:
            continue
        count = {"": 1, "vision": cfg.vision.num_layers, "text": cfg.text.num_layers}[p.layers]
        for i in range(count):
            out.append(Entry(p.ours.format(i=i), tuple(h.format(i=i) for h in p.hf), p))
    return out


def split_kind(our_name: str) -> str:
    """TP split kind of one of our parameter names (global or local layer index)."""
    generic = _LAYER_INDEX.sub(".{i}.", our_name)
    for p in TABLE:
        if p.ours == generic:
            return p.split
    raise KeyError(f"not a Qwen2-VL parameter name: {our_name}")


def ours_shapes(cfg: Qwen2VLConfig) -> Dict[str, Tuple[int, ...]]:
    return {e.ours: tuple(e.param.shape(cfg)) for e in entries(cfg)}


def hf_shapes(cfg: Qwen2VLConfig) -> Dict[str, Tuple[int, ...]]:
    """Hub-layout HF shapes, derived by running each transform on meta tensors."""
    out = {}
    for e in entries(cfg):
        meta = torch.empty(e.param.shape(cfg), device="meta")
        for name, t in zip(e.hf, e.param.transform.to_hf(meta, cfg)):
            out[name] = tuple(t.shape)
    return out


_LAYER_INDEX = re.compile(r"\.\d+\.")


# ---- HF key layouts -------------------------------------------------------------------------

_INTERNAL_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))


def hub_key(name: str) -> str:
    """transformers-5 internal names (model.visual.*, model.language_model.*) -> hub names."""
    for internal, hub in _INTERNAL_PREFIXES:
        if name.startswith(internal):
            return hub + name[len(internal):]
    return name


def check_hf_keys(keys, cfg: Qwen2VLConfig, source: str = "HF checkpoint",
                  shapes: Optional[Mapping[str, Sequence[int]]] = None) -> None:
    """Every expected hub key present (with its shape when ``shapes`` is given), none left over."""
    want = hf_shapes(cfg)
    keys = set(keys)
    optional = {HF_LM_HEAD} if cfg.text.tie_word_embeddings else set()
    missing = sorted(set(want) - keys)
    extra = sorted(keys - set(want) - optional)
    if missing:
        raise UserError(f"{source}: {len(missing)} parameter(s) missing for this config, e.g. {_few(missing)}")
    if extra:
        raise UserError(f"{source}: {len(extra)} parameter(s) not used by Qwen2-VL, e.g. {_few(extra)}")
    for name, shape in (shapes or {}).items():
        if name in want and tuple(shape) != want[name]:
            raise UserError(f"{source}: {name} has shape {list(shape)}, config.json implies {list(want[name])}")


def check_ours_keys(keys, cfg: Qwen2VLConfig, source: str = "checkpoint") -> None:
    want = set(ours_shapes(cfg))
    keys = set(keys)
    missing, extra = sorted(want - keys), sorted(keys - want)
    if missing:
        raise UserError(f"{source}: {len(missing)} parameter(s) missing, e.g. {_few(missing)}")
    if extra:
        raise UserError(f"{source}: {len(extra)} unknown parameter(s), e.g. {_few(extra)}")


def _few(names, n=3):
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


# ---- lazy views and the two directions ------------------------------------------------------

class HFToOurs(Mapping):
    """Our full (TP=1) state, built one tensor at a time from a hub-layout HF mapping."""

    def __init__(self, hf_state: Mapping[str, torch.Tensor], cfg: Qwen2VLConfig):
        self.hf, self.cfg = hf_state, cfg
        self._by_name = {e.ours: e for e in entries(cfg)}

    def __getitem__(self, name):
        e = self._by_name[name]
        return e.param.transform.to_ours([self.hf[h] for h in e.hf], self.cfg)

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self):
        return len(self._by_name)


class OursToHF(Mapping):
    """Hub-layout HF state, built from our full state one row at a time.

    The sibling outputs of a row (q/k/v, gate/up) are kept until asked for, so
    every row is transformed once.
    """

    def __init__(self, mm_state: Mapping[str, torch.Tensor], cfg: Qwen2VLConfig):
        self.mm, self.cfg = mm_state, cfg
        self._by_name = {h: e for e in entries(cfg) for h in e.hf}
        self._pending: Dict[str, torch.Tensor] = {}

    def __getitem__(self, name):
        if name in self._pending:
            return self._pending.pop(name)
        e = self._by_name[name]
        outs = dict(zip(e.hf, e.param.transform.to_hf(self.mm[e.ours], self.cfg)))
        self._pending = {k: v for k, v in outs.items() if k != name}
        return outs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self):
        return len(self._by_name)


def hf_to_mm(hf_state: Mapping[str, torch.Tensor], cfg: Qwen2VLConfig) -> Dict[str, torch.Tensor]:
    """Full TP=1 state in our names from an HF state (either key layout; may be lazy)."""
    hub = _as_hub(hf_state)
    shapes = getattr(hf_state, "shapes", None)  # a streaming reader knows shapes without loading
    if shapes is None and isinstance(hf_state, dict):
        shapes = {k: v.shape for k, v in hub.items()}
    check_hf_keys(hub.keys(), cfg, shapes=shapes)
    return dict(HFToOurs(hub, cfg))


def mm_to_hf(mm_state: Mapping[str, torch.Tensor], cfg: Qwen2VLConfig) -> Dict[str, torch.Tensor]:
    """Hub-layout HF state from our full TP=1 state."""
    check_ours_keys(mm_state.keys(), cfg)
    return dict(OursToHF(mm_state, cfg))


def _as_hub(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if all(hub_key(k) == k for k in state.keys()):
        return state
    return _RenamedView(state)


class _RenamedView(Mapping):
    def __init__(self, state):
        self.state = state
        self.names: Dict[str, str] = {}
        for k in state.keys():
            h = hub_key(k)
            if h in self.names:
                raise UserError(f"HF checkpoint: {k} and {self.names[h]} are the same parameter ({h})")
            self.names[h] = k

    def __getitem__(self, name):
        return self.state[self.names[name]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)
