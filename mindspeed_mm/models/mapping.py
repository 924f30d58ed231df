"""Weight mapping between Hugging Face parameter names and ours, as one declarative table.

Every parameter of our model (full, TP=1, global layer indices) is one
:class:`Param` row: our name, the hub-layout HF name(s) it is made of, the
transform between the two, how tensor parallelism splits it, and its full
shape as a function of the model config.  A family's spec holds one
:class:`MappingTable` (``mindspeed_mm/models/qwen2vl/mapping.py``); both
conversion directions, the model loader and the shard/merge of
``models/sharding.py`` are driven by it, and nothing else knows a parameter name.

Lazy views (:class:`HFToOurs`, :class:`OursToHF`) build one tensor at a time
from a source mapping, so a conversion never holds more than what it writes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from mindspeed_mm.errors import UserError

if TYPE_CHECKING:
    import torch

# How tensor parallelism splits a parameter (models/sharding.py cuts and joins by it).
REPLICATED = "replicated"      # every rank holds all of it (norms, row-parallel biases, patch embed)
COLUMN = "column"              # dim 0 in TP contiguous pieces (qkv is already grouped so this is per group)
ROW = "row"                    # dim 1 in TP contiguous pieces
GATED_COLUMN = "gated_column"  # [gate; up] on dim 0: each rank holds [gate_r; up_r]
VOCAB = "vocab"                # dim 0 after padding the vocabulary to a multiple of divisible_by * TP
SPLITS = (REPLICATED, COLUMN, ROW, GATED_COLUMN, VOCAB)

# Our names for the megatron GPT language model every family here shares.
TEXT_LAYER = "language_model.decoder.layers.{i}."
EMBEDDING = "language_model.embedding.word_embeddings.weight"
OUTPUT_LAYER = "language_model.output_layer.weight"
FINAL_NORM = "language_model.decoder.final_layernorm."
HF_LM_HEAD = "lm_head.weight"

# transformers-5 internal names -> hub names (both layouts are read; hub names are written).
_INTERNAL_PREFIXES = (("model.visual.", "visual."), ("model.language_model.", "model."))
_LAYER_INDEX = re.compile(r"\.\d+\.")


class Rows:
    """Row ids standing in for a tensor: ``ids`` (numpy, 1 + source row number, 0 = a row of zeros) over the
    leading dims, ``row`` the shape of one row, moved as a whole.  It does what the transforms and TP splits
    do to a tensor (reshape, transpose, split, chunk, slices, new_zeros, cat), so running them on row ids
    tells which source rows every output is made of, with no tensor data and no torch (conversion plans,
    shape checks).  Cutting inside a row (a row-parallel split) is followed for the shape only: ``whole``
    is then False."""

    def __init__(self, ids, row=(), whole: bool = True):
        self.ids, self.row, self.whole = ids, tuple(int(d) for d in row), whole

    @classmethod
    def like(cls, shape: Sequence[int], base: int = 0) -> "Rows":
        """Ids base+1 .. base+shape[0] for a tensor of ``shape`` (rows along dim 0)."""
        import numpy as np

        shape = tuple(int(d) for d in shape)
        if not shape:
            return cls(np.full((), base + 1, np.int64))
        return cls(np.arange(base + 1, base + 1 + shape[0], dtype=np.int64), shape[1:])

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.ids.shape) + self.row

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def contiguous(self) -> "Rows":
        return self

    clone = contiguous

    def reshape(self, *shape) -> "Rows":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if -1 in shape:
            known = math.prod(d for d in shape if d != -1)
            shape = tuple(self.numel() // known if d == -1 else d for d in shape)
        if math.prod(shape) != self.numel():
            raise ValueError(f"cannot reshape {list(self.shape)} to {list(shape)}")
        for k in range(len(shape), -1, -1):  # the row as the fewest trailing dims that hold it
            if math.prod(shape[k:]) == math.prod(self.row) and math.prod(shape[:k]) == self.ids.size:
                return Rows(self.ids.reshape(shape[:k]), shape[k:], self.whole)
        raise ValueError(f"reshape {list(self.shape)} -> {list(shape)} splits a row")

    view = reshape

    def transpose(self, a: int, b: int) -> "Rows":
        if max(a, b) >= self.ids.ndim:
            raise ValueError("transpose inside a row")
        return Rows(self.ids.swapaxes(a, b), self.row, self.whole)

    def split(self, sizes, dim: int = 0) -> List["Rows"]:
        length = self.shape[dim]
        if isinstance(sizes, int):
            sizes = [min(sizes, length - at) for at in range(0, length, sizes)]
        if sum(sizes) != length:
            raise ValueError(f"split sizes {list(sizes)} do not add up to {length}")
        out, at = [], 0
        for n in sizes:
            if dim < self.ids.ndim:
                index = (slice(None),) * dim + (slice(at, at + n),)
                out.append(Rows(self.ids[index], self.row, self.whole))
            else:  # inside a row: only the shape is followed
                row = list(self.row)
                row[dim - self.ids.ndim] = n
                out.append(Rows(self.ids, row, whole=False))
            at += n
        return out

    def chunk(self, n: int, dim: int = 0) -> List["Rows"]:
        return self.split(-(-self.shape[dim] // n), dim)

    def __getitem__(self, key) -> "Rows":
        if not isinstance(key, slice) or self.ids.ndim == 0:
            raise ValueError("row ids take a slice of dim 0 only")
        return Rows(self.ids[key], self.row, self.whole)

    def new_zeros(self, *shape) -> "Rows":
        import numpy as np

        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        k = len(shape) - len(self.row)
        if k < 0 or tuple(shape[k:]) != self.row:
            raise ValueError(f"zeros of shape {list(shape)} are not whole rows of {list(self.row)}")
        return Rows(np.zeros(shape[:k], np.int64), self.row)


def cat(ts: Sequence[Any], dim: int = 0):
    """torch.cat, or the same on :class:`Rows` (row ids; torch is then never imported)."""
    if isinstance(ts[0], Rows):
        import numpy as np

        if len({t.row for t in ts}) != 1 or dim >= ts[0].ids.ndim:
            raise ValueError("cat inside a row")
        return Rows(np.concatenate([t.ids for t in ts], axis=dim), ts[0].row, all(t.whole for t in ts))
    import torch

    return torch.cat(list(ts), dim=dim)


@dataclass(frozen=True)
class Transform:
    """HF tensors (in the row's hf order) <-> our tensor, given the model config."""
    name: str
    to_ours: Callable[[List[torch.Tensor], Any], torch.Tensor]
    to_hf: Callable[[torch.Tensor, Any], List[torch.Tensor]]


COPY = Transform("copy", lambda ts, cfg: ts[0], lambda t, cfg: [t])
GATE_UP = Transform("gate_up", lambda ts, cfg: cat(ts, dim=0), lambda t, cfg: list(t.chunk(2, dim=0)))


def pad_vocab(t: torch.Tensor, rows: int, cfg) -> torch.Tensor:
    """Keep the real vocabulary rows of ``t`` [>=vocab, h] and zero-pad to ``rows``."""
    t = t[:cfg.text.vocab_size]
    if t.shape[0] == rows:
        return t
    return cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], dim=0)


PADDED_VOCAB = Transform("padded_vocab", lambda ts, cfg: pad_vocab(ts[0], cfg.text.padded_vocab_size(1), cfg),
                         lambda t, cfg: [t[:cfg.text.vocab_size]])


@dataclass(frozen=True)
class Param:
    ours: str                   # our name; "{i}" is the layer index when layers != ""
    hf: Tuple[str, ...]         # hub-layout HF names, in the order the transform takes them
    transform: Transform
    split: str                  # one of SPLITS
    shape: Callable[[Any], Tuple[int, ...]]  # our full (TP=1) shape from the model config
    layers: str = ""            # "vision" / "text": the row repeats per layer of cfg.vision / cfg.text


@dataclass(frozen=True)
class Entry:
    """One row of a table with its layer index filled in."""
    ours: str
    hf: Tuple[str, ...]
    param: Param

    @property
    def split(self) -> str:
        return self.param.split


def hub_key(name: str) -> str:
    """transformers-5 internal names (model.visual.*, model.language_model.*) -> hub names."""
    for internal, hub in _INTERNAL_PREFIXES:
        if name.startswith(internal):
            return hub + name[len(internal):]
    return name


class MappingTable:
    """The rows of one model family, expanded per config on demand.

    Tied embeddings have no output layer: HF has no (or an ignored) lm_head.
    """

    def __init__(self, family: str, rows: Sequence[Param]):
        self.family, self.rows = family, tuple(rows)
        bad = [p.ours for p in self.rows if p.split not in SPLITS]
        if bad:
            raise ValueError(f"{family} mapping: unknown split kind for {bad}")

    def entries(self, cfg) -> List[Entry]:
        """Every parameter of the full model for ``cfg``, in model order."""
        out = []
        for p in self.rows:
            if p.ours == OUTPUT_LAYER and cfg.text.tie_word_embeddings:
                continue
            count = getattr(cfg, p.layers).num_layers if p.layers else 1
            for i in range(count):
                out.append(Entry(p.ours.format(i=i), tuple(h.format(i=i) for h in p.hf), p))
        return out

    def split_kind(self, our_name: str) -> str:
        """TP split kind of one of our parameter names (global or local layer index)."""
        generic = _LAYER_INDEX.sub(".{i}.", our_name)
        for p in self.rows:
            if p.ours == generic:
                return p.split
        raise KeyError(f"not a {self.family} parameter name: {our_name}")

    def ours_shapes(self, cfg) -> Dict[str, Tuple[int, ...]]:
        return {e.ours: tuple(e.param.shape(cfg)) for e in self.entries(cfg)}

    def hf_shapes(self, cfg) -> Dict[str, Tuple[int, ...]]:
        """Hub-layout HF shapes, derived by running each transform on row ids (no tensor data, no torch)."""
        out = {}
        for e in self.entries(cfg):
            for name, t in zip(e.hf, e.param.transform.to_hf(Rows.like(e.param.shape(cfg)), cfg)):
                out[name] = tuple(t.shape)
        return out

    def check_hf_keys(self, keys, cfg, source: str = "HF checkpoint",
                      shapes: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        """Every expected hub key present (with its shape when ``shapes`` is given), none left over."""
        want = self.hf_shapes(cfg)
        keys = set(keys)
        optional = {HF_LM_HEAD} if cfg.text.tie_word_embeddings else set()
        missing = sorted(set(want) - keys)
        extra = sorted(keys - set(want) - optional)
        if missing:
            raise UserError(f"{source}: {len(missing)} parameter(s) missing for this config, e.g. {_few(missing)}")
        if extra:
            raise UserError(f"{source}: {len(extra)} parameter(s) not used by {self.family}, e.g. {_few(extra)}")
        for name, shape in (shapes or {}).items():
            if name in want and tuple(shape) != want[name]:
                raise UserError(f"{source}: {name} has shape {list(shape)}, config.json implies "
                                f"{list(want[name])}")

    def check_ours_keys(self, keys, cfg, source: str = "checkpoint") -> None:
        want = set(self.ours_shapes(cfg))
        keys = set(keys)
        missing, extra = sorted(want - keys), sorted(keys - want)
        if missing:
            raise UserError(f"{source}: {len(missing)} parameter(s) missing, e.g. {_few(missing)}")
        if extra:
            raise UserError(f"{source}: {len(extra)} unknown parameter(s), e.g. {_few(extra)}")

    def hf_to_mm(self, hf_state: Mapping[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
        """Full TP=1 state in our names from an HF state (either key layout; may be lazy)."""
        hub = _as_hub(hf_state)
        shapes = getattr(hf_state, "shapes", None)  # a streaming reader knows shapes without loading
        if shapes is None and isinstance(hf_state, dict):
            shapes = {k: v.shape for k, v in hub.items()}
        self.check_hf_keys(hub.keys(), cfg, shapes=shapes)
        return dict(HFToOurs(hub, cfg, self))

    def mm_to_hf(self, mm_state: Mapping[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
        """Hub-layout HF state from our full TP=1 state."""
        self.check_ours_keys(mm_state.keys(), cfg)
        return dict(OursToHF(mm_state, cfg, self))


def _few(names, n=3):
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


# ---- lazy views ----------------------------------------------------------------------------

class HFToOurs(Mapping):
    """Our full (TP=1) state, built one tensor at a time from a hub-layout HF mapping."""

    def __init__(self, hf_state: Mapping[str, torch.Tensor], cfg, table: MappingTable):
        self.hf, self.cfg = hf_state, cfg
        self._by_name = {e.ours: e for e in table.entries(cfg)}

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

    def __init__(self, mm_state: Mapping[str, torch.Tensor], cfg, table: MappingTable):
        self.mm, self.cfg = mm_state, cfg
        self._by_name = {h: e for e in table.entries(cfg) for h in e.hf}
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
