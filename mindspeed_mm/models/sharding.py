"""Tensor- and pipeline-parallel split and merge of our full state, driven by a family's mapping table.

Pipeline: stage 0 holds the vision encoder, the projector and the embedding
(and its LLM layers, possibly none); the last stage holds the final norm and
the output layer.  Each stage's state uses local decoder layer indices
0..n-1, as megatron saves it.  With tied embeddings the output layer exists
only when PP > 1: the last stage then holds a copy of the embedding.

Tensor parallel: each parameter's split kind comes from the mapping table
(models/mapping.py; the family's rows in models/<family>/mapping.py).  Every
function takes that table first; a family's spec binds it (models/spec.py).  Vocab-parallel tensors are padded to
``cfg.text.padded_vocab_size(tp)`` before splitting; merging strips that
padding back to ``padded_vocab_size(1)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.mapping import (COLUMN, EMBEDDING, FINAL_NORM, GATED_COLUMN, OUTPUT_LAYER, REPLICATED, ROW,
                                         TEXT_LAYER, VOCAB, MappingTable, Rows, cat, pad_vocab)
from mindspeed_mm.models.parallel import stage_offsets

if TYPE_CHECKING:
    import torch

_TEXT_PREFIX = TEXT_LAYER.split("{i}")[0]  # "language_model.decoder.layers."


def stage_names(table: MappingTable, cfg, stage_layers: Sequence[int], pp_rank: int) -> List[Tuple[str, str]]:
    """(local name, global source name) of every parameter stage ``pp_rank`` holds."""
    if sum(stage_layers) != cfg.text.num_layers:
        raise UserError(f"pipeline stages hold {sum(stage_layers)} LLM layers, the model has {cfg.text.num_layers}")
    first, last = pp_rank == 0, pp_rank == len(stage_layers) - 1
    lo = stage_offsets(stage_layers)[pp_rank]
    hi = lo + stage_layers[pp_rank]
    out = []
    for e in table.entries(cfg):
        name = e.ours
        if name.startswith(_TEXT_PREFIX):
            layer = _layer_of(name)
            if lo <= layer < hi:
                out.append((_with_layer(name, layer - lo), name))
        elif name.startswith(FINAL_NORM) or name == OUTPUT_LAYER:
            if last:
                out.append((name, name))
        elif first:  # vision encoder, projector, embedding
            out.append((name, name))
    if last and not first and cfg.text.tie_word_embeddings:
        out.append((OUTPUT_LAYER, EMBEDDING))  # megatron's copy of the tied embedding on the last stage
    return out


def _layer_of(name: str) -> int:
    return int(name[len(_TEXT_PREFIX):].split(".", 1)[0])


def _with_layer(name: str, layer: int) -> str:
    rest = name[len(_TEXT_PREFIX):].split(".", 1)[1]
    return f"{_TEXT_PREFIX}{layer}.{rest}"


# ---- tensor parallel ------------------------------------------------------------------------

def shard_tensor(table: MappingTable, name: str, t: torch.Tensor, cfg, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rank ``tp_rank``'s piece of full tensor ``t`` (a view when possible; clone to free ``t``)."""
    kind = table.split_kind(name)
    if kind == REPLICATED or tp_size == 1 and kind != VOCAB:
        return t
    if kind == COLUMN:
        return _chunk(t, tp_size, 0, name)[tp_rank]
    if kind == ROW:
        return _chunk(t, tp_size, 1, name)[tp_rank]
    if kind == GATED_COLUMN:
        gate, up = _chunk(t, 2, 0, name)
        return cat([_chunk(gate, tp_size, 0, name)[tp_rank], _chunk(up, tp_size, 0, name)[tp_rank]])
    if kind == VOCAB:
        return _chunk(pad_vocab(t, cfg.text.padded_vocab_size(tp_size), cfg), tp_size, 0, name)[tp_rank]
    raise AssertionError(kind)


def merge_tensor(table: MappingTable, name: str, pieces: Sequence[torch.Tensor], cfg) -> torch.Tensor:
    """Full tensor from the TP pieces in rank order (inverse of :func:`shard_tensor`)."""
    kind = table.split_kind(name)
    if kind == REPLICATED or len(pieces) == 1 and kind != VOCAB:
        return pieces[0]
    if kind == COLUMN:
        return cat(list(pieces), dim=0)
    if kind == ROW:
        return cat(list(pieces), dim=1)
    if kind == GATED_COLUMN:
        halves = [_chunk(p, 2, 0, name) for p in pieces]
        return cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    if kind == VOCAB:
        return pad_vocab(cat(list(pieces), dim=0), cfg.text.padded_vocab_size(1), cfg)
    raise AssertionError(kind)


def _chunk(t: torch.Tensor, n: int, dim: int, name: str):
    if t.shape[dim] % n:
        raise UserError(f"{name}: dimension {dim} of shape {list(t.shape)} does not split into {n} parts")
    return t.chunk(n, dim=dim)


# ---- whole states ---------------------------------------------------------------------------

def shard_state(table: MappingTable, full_state: Mapping[str, torch.Tensor], cfg, tp_size: int, tp_rank: int,
                stage_layers: Sequence[int], pp_rank: int) -> Dict[str, torch.Tensor]:
    """One (tp_rank, pp_rank) state with local names from the full TP=1 state (may be lazy).

    Pieces are cloned when TP > 1 so the full tensors can be freed.
    """
    cfg.check_parallel(tp_size)
    out = {}
    for local, source in stage_names(table, cfg, stage_layers, pp_rank):
        piece = shard_tensor(table, local, full_state[source], cfg, tp_size, tp_rank)
        out[local] = piece.clone() if tp_size > 1 else piece
    return out


def merge_shards(table: MappingTable, shards: Mapping[Tuple[int, int], Mapping[str, torch.Tensor]], cfg,
                 stage_layers: Sequence[int]) -> Dict[str, torch.Tensor]:
    """The full TP=1 state from every (tp_rank, pp_rank) state (inverse of :func:`shard_state`)."""
    return dict(MergedView(table, shards, cfg, stage_layers))


class MergedView(Mapping):
    """The full state, merged one tensor at a time from per-rank states (lazy or not).

    Checks that every rank holds exactly the parameters its stage should
    (megatron's ``_extra_state`` entries are ignored); the tied last-stage copy
    of the embedding is not read.
    """

    def __init__(self, table: MappingTable, shards: Mapping[Tuple[int, int], Mapping[str, torch.Tensor]], cfg,
                 stage_layers: Sequence[int], config_source: str = "the model config",
                 rank_name: Optional[Callable[[int, int], str]] = None):
        self.table, self.shards, self.cfg = table, shards, cfg
        tps = sorted({tp for tp, _ in shards})
        pps = sorted({pp for _, pp in shards})
        if tps != list(range(len(tps))) or pps != list(range(len(stage_layers))) or \
                len(shards) != len(tps) * len(pps):
            raise UserError(f"checkpoint: ranks {sorted(shards)} do not form a TP x PP grid for "
                            f"{len(stage_layers)} pipeline stage(s)")
        self.tp_size = len(tps)
        self.where: Dict[str, Tuple[int, str]] = {}  # global name -> (pp_rank, local name)
        for pp in pps:
            names = stage_names(table, cfg, stage_layers, pp)
            for tp in tps:
                _check_rank_keys(shards[(tp, pp)].keys(), {local for local, _ in names}, tp, pp)
                _check_rank_shapes(table, shards[(tp, pp)], names, cfg, len(tps), tp, pp, config_source,
                                   rank_name(tp, pp) if rank_name else f"checkpoint rank tp={tp} pp={pp}")
            for local, source in names:
                if source == EMBEDDING and local == OUTPUT_LAYER:
                    continue
                self.where[source] = (pp, local)

    def __getitem__(self, name):
        pp, local = self.where[name]
        return merge_tensor(self.table, local, [self.shards[(tp, pp)][local] for tp in range(self.tp_size)], self.cfg)

    def __iter__(self):
        return iter(self.where)

    def __len__(self):
        return len(self.where)


def _check_rank_shapes(table, state, names, cfg, tp_size, tp, pp, config_source, where):
    """Every tensor of one rank has the shape ``cfg`` at ``tp_size`` gives its piece (names from stage_names)."""
    full = table.ours_shapes(cfg)
    for local, source in names:
        want = tuple(shard_tensor(table, local, Rows.like(full[source]), cfg, tp_size, tp).shape)
        if not hasattr(state[local], "shape"):
            raise UserError(f"{where}: {local} is {type(state[local]).__name__}, not a tensor")
        got = tuple(state[local].shape)
        if got != want:
            raise UserError(f"{where}: {local} has shape {list(got)} but {config_source} at TP {tp_size} asks "
                            f"{list(want)}: the checkpoint does not match this model config / layout")


def _check_rank_keys(keys, want, tp, pp):
    keys = {k for k in keys if not k.endswith("_extra_state")}
    missing, extra = sorted(want - keys), sorted(keys - want)
    where = f"checkpoint rank tp={tp} pp={pp}"
    if missing:
        raise UserError(f"{where}: {len(missing)} parameter(s) missing, e.g. {', '.join(missing[:3])}")
    if extra:
        raise UserError(f"{where}: {len(extra)} unexpected parameter(s), e.g. {', '.join(extra[:3])}")
