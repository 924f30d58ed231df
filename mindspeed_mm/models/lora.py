"""LoRA adapters on megatron-core's tensor-parallel linears, equal to PEFT's LoRA on the HF model.

An adapted linear ``W`` gets ``y = W x + (alpha / r) * B A dropout(x)`` with A [r, in], B [out, r] per HF
projection, as PEFT: megatron fuses HF's q/k/v (and gate/up) into one linear, so ``linear_qkv`` carries
three adapters (q, k, v) and the LLM's ``linear_fc1`` two (gate, up), each with its own A and B; their
outputs are laid out as the fused weight's rows are (per query group [q; k; v], [gate; up]).  A single-
projection linear whose rows megatron permutes (the ViT's qkv) keeps one adapter whose B rows are permuted
the same way.  Everything about a target (its HF projections, shapes, TP split, row layout) is read from
the family's mapping table row of ``<module>.weight``: there is no second table.

Tensor parallelism shards A and B the way the base weight is sharded, so every rank computes its slice of
the single-process LoRA product:

* column-parallel (qkv, fc1): A replicated, B split on its output rows.  The rank-r activation ``A x`` is
  copied into the TP region (all-reduced in backward) or, under sequence parallelism, all-gathered over
  the sequence (reduce-scattered in backward, A's gradient then summed over TP like a norm's);
* row-parallel (proj, fc2): A split on its input columns; the partial ``A x`` is all-reduced (reduce-
  scattered over the sequence under sequence parallelism, B's gradient then summed over TP), B replicated.

Adapters hang off the base linear as a child module (``<linear>.lora``) called from a forward hook, so the
base parameter names, the mapping table and base checkpoints stay as they are.  Adapter tensors have three
forms: full (our module names, global layer index, TP=1: ``<module>.lora_A.<k>``), this rank's shard
(local layer index), and HF's (``<hf module>.lora_A.weight``, hub names, as PEFT names them).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.mapping import COLUMN, GATED_COLUMN, ROW, TEXT_LAYER, Entry, MappingTable, Rows
from mindspeed_mm.models.parallel import stage_offsets

# --lora-target-modules vocabulary: megatron module names; "vision." / "projector." pick the ViT blocks and
# the patch merger, a bare name the LLM decoder layers (Megatron-Bridge's default set).
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
           "vision.linear_qkv", "vision.linear_proj", "vision.linear_fc1", "vision.linear_fc2",
           "projector.linear_fc1", "projector.linear_fc2")
DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_LEAF = {"linear_qkv": "self_attention.linear_qkv", "linear_proj": "self_attention.linear_proj",
         "linear_fc1": "mlp.linear_fc1", "linear_fc2": "mlp.linear_fc2"}
PROJECTOR = "vision_projector."
ADAPTER = "lora"  # the child module's name under an adapted linear


@dataclass(frozen=True)
class LoRASettings:
    """PEFT's LoraConfig subset: rank r, alpha (scale alpha / r), dropout on the adapter input, targets."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: Tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"--lora-rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise UserError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise UserError("--lora-target-modules: give at least one module")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown:
            raise UserError(f"--lora-target-modules: unknown module {unknown[0]!r}; choose from {', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(self.targets)))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoRASettings":
        return cls(int(d["rank"]), float(d["alpha"]), float(d.get("dropout", 0.0)), tuple(d["targets"]))


# ---- what each adapted linear looks like, from the mapping table ---------------------------------

@dataclass(frozen=True)
class AdapterSpec:
    """One adapted linear of the full model: our module name (global layer index), its HF projections
    (hub module names, in the table row's order) with their [out, in] shapes, and how it is parallel."""
    module: str
    hf_modules: Tuple[str, ...]
    shapes: Tuple[Tuple[int, int], ...]
    split: str            # COLUMN, GATED_COLUMN or ROW: the base weight's
    layout: str           # how part outputs form the fused rows: "single", "qkv_groups" or "concat"
    entry: Entry          # the base weight's table row

    @property
    def column(self) -> bool:
        return self.split != ROW

    def a_name(self, k: int) -> str:
        return f"{self.module}.lora_A.{k}"

    def b_name(self, k: int) -> str:
        return f"{self.module}.lora_B.{k}"


def _target_of(entry: Entry) -> Optional[str]:
    """The --lora-target-modules name that selects this table row's linear, or None."""
    if not entry.ours.endswith(".weight"):
        return None
    module = entry.ours[:-len(".weight")]
    if entry.param.layers == "text":
        prefix = ""
    elif entry.param.layers == "vision":
        prefix = "vision."
    elif module.startswith(PROJECTOR):
        return "projector." + module[len(PROJECTOR):] if module[len(PROJECTOR):] in ("linear_fc1", "linear_fc2") \
            else None
    else:
        return None
    for name, leaf in _LEAF.items():
        if module.endswith("." + leaf):
            return prefix + name
    return None


def adapter_specs(table: MappingTable, cfg, targets: Iterable[str]) -> List[AdapterSpec]:
    """Every adapted linear of the full model, in model order."""
    targets = set(targets)
    out = []
    for e in table.entries(cfg):
        if _target_of(e) not in targets:
            continue
        if e.split not in (COLUMN, GATED_COLUMN, ROW):
            raise UserError(f"--lora-target-modules: {e.ours} is not a tensor-parallel linear")
        parts = e.param.transform.to_hf(Rows.like(e.param.shape(cfg)), cfg)
        shapes = tuple(tuple(p.shape) for p in parts)
        if len(shapes) == 1:
            layout = "single"
        elif e.split == GATED_COLUMN:
            layout = "concat"
        elif e.param.transform.name == "text_qkv":
            layout = "qkv_groups"
        else:
            raise AssertionError(f"no LoRA layout for {e.ours} ({e.param.transform.name})")
        out.append(AdapterSpec(e.ours[:-len(".weight")], tuple(h[:-len(".weight")] for h in e.hf), shapes,
                               e.split, layout, e))
    if not out:
        raise UserError(f"--lora-target-modules {','.join(sorted(targets))}: no such linear in this model")
    return out


# ---- full <-> HF <-> rank shards -------------------------------------------------------------

def init_full(specs: Sequence[AdapterSpec], rank: int, seed: int) -> Dict[str, torch.Tensor]:
    """PEFT's default initialisation, the same for any parallel layout: A ~ U(-1/sqrt(in), 1/sqrt(in))
    (kaiming-uniform with a = sqrt(5)) from a generator seeded by the seed and the name, B = 0."""
    out = {}
    for s in specs:
        for k, (rows, cols) in enumerate(s.shapes):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(s.a_name(k).encode()))
            bound = 1.0 / math.sqrt(cols)
            out[s.a_name(k)] = torch.empty(rank, cols).uniform_(-bound, bound, generator=gen)
            out[s.b_name(k)] = torch.zeros(rows, rank)
    return out


def _b_to_ours(spec: AdapterSpec, b: torch.Tensor, cfg) -> torch.Tensor:
    # A single projection with permuted rows (the ViT's qkv): B's rows move as the weight's do.
    return spec.entry.param.transform.to_ours([b], cfg) if spec.layout == "single" else b


def _b_to_hf(spec: AdapterSpec, b: torch.Tensor, cfg) -> torch.Tensor:
    return spec.entry.param.transform.to_hf(b, cfg)[0] if spec.layout == "single" else b


def hf_to_full(hf: Mapping[str, torch.Tensor], specs: Sequence[AdapterSpec], cfg,
               source: str = "adapter") -> Dict[str, torch.Tensor]:
    """HF adapters (``<hub module>.lora_A.weight`` / ``.lora_B.weight``) -> full ours; shapes checked."""
    out, rank = {}, None
    for s in specs:
        for k, (hf_module, (rows, cols)) in enumerate(zip(s.hf_modules, s.shapes)):
            a_key, b_key = f"{hf_module}.lora_A.weight", f"{hf_module}.lora_B.weight"
            for key in (a_key, b_key):
                if key not in hf:
                    raise UserError(f"{source}: no {key} (the adapters do not cover this model's targets)")
            a, b = hf[a_key], hf[b_key]
            rank = a.shape[0] if rank is None else rank
            if tuple(a.shape) != (rank, cols) or tuple(b.shape) != (rows, rank):
                raise UserError(f"{source}: {hf_module} adapters have shapes {list(a.shape)} / {list(b.shape)}, "
                                f"this model needs [{rank}, {cols}] / [{rows}, {rank}]")
            out[s.a_name(k)], out[s.b_name(k)] = a, _b_to_ours(s, b, cfg)
    return out


def full_to_hf(full: Mapping[str, torch.Tensor], specs: Sequence[AdapterSpec], cfg) -> Dict[str, torch.Tensor]:
    out = {}
    for s in specs:
        for k, hf_module in enumerate(s.hf_modules):
            out[f"{hf_module}.lora_A.weight"] = full[s.a_name(k)]
            out[f"{hf_module}.lora_B.weight"] = _b_to_hf(s, full[s.b_name(k)], cfg)
    return out


def merge_into(hf_adapters: Mapping[str, torch.Tensor], scale: float):
    """``fold(hub name, tensor)``: an adapted projection's weight with its adapter folded in,
    W + scale * B A (computed in fp32, returned in W's dtype); any other tensor unchanged."""
    def fold(name: str, w: torch.Tensor) -> torch.Tensor:
        module = name[:-len(".weight")] if name.endswith(".weight") else None
        a = hf_adapters.get(f"{module}.lora_A.weight")
        if a is None:
            return w
        b = hf_adapters[f"{module}.lora_B.weight"]
        return (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return fold


def merged_weights(hf_base: Mapping[str, torch.Tensor], hf_adapters: Mapping[str, torch.Tensor],
                   specs: Sequence[AdapterSpec], scale: float) -> Dict[str, torch.Tensor]:
    """:func:`merge_into` over every adapted projection of ``hf_base`` (hub names; others left out)."""
    fold = merge_into(hf_adapters, scale)
    names = [f"{m}.weight" for s in specs for m in s.hf_modules]
    return {n: fold(n, hf_base[n]) for n in names}


def shard(spec: AdapterSpec, full: Mapping[str, torch.Tensor], tp_size: int, tp_rank: int) -> List[torch.Tensor]:
    """This rank's [A_0, B_0, A_1, B_1, ...] of one adapted linear."""
    out = []
    for k in range(len(spec.shapes)):
        a, b = full[spec.a_name(k)], full[spec.b_name(k)]
        if spec.column:
            b = _split(b, tp_size, 0, spec.b_name(k))[tp_rank]
        else:
            a = _split(a, tp_size, 1, spec.a_name(k))[tp_rank]
        out += [a.contiguous(), b.contiguous()]
    return out


def merge(spec: AdapterSpec, pieces: Sequence[Sequence[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`shard` over the TP ranks' [A_0, B_0, ...] (in rank order)."""
    out = {}
    for k in range(len(spec.shapes)):
        a_parts, b_parts = [p[2 * k] for p in pieces], [p[2 * k + 1] for p in pieces]
        out[spec.a_name(k)] = a_parts[0] if spec.column else torch.cat(a_parts, dim=1)
        out[spec.b_name(k)] = torch.cat(b_parts, dim=0) if spec.column else b_parts[0]
    return out


def _split(t: torch.Tensor, n: int, dim: int, name: str):
    if t.shape[dim] % n:
        raise UserError(f"{name}: dimension {dim} of shape {list(t.shape)} does not split into {n} parts")
    return t.chunk(n, dim=dim)


# ---- the module --------------------------------------------------------------------------------

class LoRAAdapter(torch.nn.Module):
    """The adapters of one tensor-parallel linear; ``forward(x)`` is what the linear's output gains."""

    def __init__(self, spec: AdapterSpec, settings: LoRASettings, tp_size: int, sequence_parallel: bool,
                 query_groups: int, dtype: torch.dtype):
        super().__init__()
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        self.spec, self.rank, self.scale = spec, settings.rank, settings.scale
        self.sequence_parallel, self.tp_size = sequence_parallel and tp_size > 1, tp_size
        self.local_groups = query_groups // tp_size if spec.layout == "qkv_groups" else 0
        self.dropout = torch.nn.Dropout(settings.dropout) if settings.dropout else torch.nn.Identity()
        self.lora_A, self.lora_B = torch.nn.ParameterList(), torch.nn.ParameterList()
        for rows, cols in spec.shapes:
            if spec.column:
                a, b = torch.empty(self.rank, cols, dtype=dtype), torch.empty(rows // tp_size, self.rank, dtype=dtype)
            else:
                a, b = torch.empty(self.rank, cols // tp_size, dtype=dtype), torch.empty(rows, self.rank, dtype=dtype)
            a, b = torch.nn.Parameter(torch.zeros_like(a)), torch.nn.Parameter(torch.zeros_like(b))
            split, replicated = (b, a) if spec.column else (a, b)
            # Split tensors count once per rank in megatron's grad norm; replicated ones only on TP rank 0.
            set_tensor_model_parallel_attributes(split, True, 0 if spec.column else 1, 1)
            if self.sequence_parallel:  # its gradient covers this rank's tokens only: summed over TP
                replicated.sequence_parallel = True
            self.lora_A.append(a)
            self.lora_B.append(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tp

        if self.spec.column:
            h = torch.cat([F.linear(self.dropout(x), a) for a in self.lora_A], dim=-1)
            h = tp.gather_from_sequence_parallel_region(h) if self.sequence_parallel \
                else tp.copy_to_tensor_model_parallel_region(h)
            parts = [F.linear(hk, b) for hk, b in zip(h.split(self.rank, dim=-1), self.lora_B)]
            y = self._layout(parts)
        else:
            h = F.linear(self.dropout(x), self.lora_A[0])  # partial sum over this rank's input columns
            h = tp.reduce_scatter_to_sequence_parallel_region(h) if self.sequence_parallel \
                else tp.reduce_from_tensor_model_parallel_region(h)
            y = F.linear(h, self.lora_B[0])
        return y * self.scale

    def _layout(self, parts: List[torch.Tensor]) -> torch.Tensor:
        if self.spec.layout == "single":
            return parts[0]
        if self.spec.layout == "concat":  # [gate_r; up_r]: this rank's rows of [gate; up]
            return torch.cat(parts, dim=-1)
        # megatron's GQA rows, per local query group: [q heads of g; k_g; v_g]
        g, lead = self.local_groups, parts[0].shape[:-1]
        return torch.cat([p.reshape(*lead, g, -1) for p in parts], dim=-1).reshape(*lead, -1)

    def local_tensors(self) -> List[torch.Tensor]:
        return [t for a, b in zip(self.lora_A, self.lora_B) for t in (a, b)]

    def extra_repr(self) -> str:
        return f"{self.spec.module}: rank {self.rank}, scale {self.scale:g}, {self.spec.layout}, " \
               f"{'column' if self.spec.column else 'row'}-parallel"


def _add_adapter_output(linear, args, output):
    out, bias = output
    return out + linear.lora(args[0]).to(out.dtype), bias


_TEXT_PREFIX = TEXT_LAYER.split("{i}")[0]  # "language_model.decoder.layers."


def stage_specs(specs: Sequence[AdapterSpec], stage_layers: Sequence[int], pp_rank: int) -> Dict[str, AdapterSpec]:
    """{local module name: spec} of the adapted linears pipeline stage ``pp_rank`` holds (decoder layers
    numbered from 0 in each stage, as megatron names and saves them; the ViT and projector on stage 0)."""
    lo = stage_offsets(stage_layers)[pp_rank]
    hi = lo + stage_layers[pp_rank]
    out = {}
    for s in specs:
        if s.module.startswith(_TEXT_PREFIX):
            layer, rest = s.module[len(_TEXT_PREFIX):].split(".", 1)
            if lo <= int(layer) < hi:
                out[f"{_TEXT_PREFIX}{int(layer) - lo}.{rest}"] = s
        elif pp_rank == 0:
            out[s.module] = s
    return out


def state_key(local_module: str, matrix: str, k: int) -> str:
    """An adapter tensor's name in a stage's state dict: ``<linear>.lora.lora_A.<k>``."""
    return f"{local_module}.{ADAPTER}.lora_{matrix}.{k}"


def apply_lora(model, specs: Sequence[AdapterSpec], settings: LoRASettings, full: Mapping[str, torch.Tensor],
               tp_size: int, tp_rank: int) -> Dict[str, LoRAAdapter]:
    """Freeze every base parameter of this stage and attach this rank's adapters (values from the full
    adapter state ``full``, e.g. :func:`init_full`).  Returns {local module name: adapter}."""
    for p in model.parameters():
        p.requires_grad_(False)
    from megatron.core import parallel_state

    modules = dict(model.named_modules())
    adapters = {}
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    for name, spec in stage_specs(specs, model.stage_layers, pp_rank).items():
        linear = modules[name]
        dtype = linear.weight.dtype
        adapter = LoRAAdapter(spec, settings, tp_size, bool(getattr(linear, "sequence_parallel", False)),
                              model.cfg.text.num_query_groups, dtype)
        with torch.no_grad():
            for param, value in zip(adapter.local_tensors(), shard(spec, full, tp_size, tp_rank)):
                param.copy_(value)
        linear.add_module(ADAPTER, adapter.to(linear.weight.device))
        linear.register_forward_hook(_add_adapter_output)
        adapters[name] = adapter
    model.input_needs_grad = True
    return adapters


def adapters_of(model) -> Dict[str, LoRAAdapter]:
    """{local module name: adapter} of a model :func:`apply_lora` has adapted."""
    return {name[:-len("." + ADAPTER)]: m for name, m in model.named_modules() if isinstance(m, LoRAAdapter)}


def adapter_state(model) -> Dict[str, torch.Tensor]:
    """This stage's adapter tensors by :func:`state_key` (what a LoRA checkpoint's rank file holds)."""
    return {state_key(name, m, k): t.detach() for name, adapter in adapters_of(model).items()
            for k, (a, b) in enumerate(zip(adapter.lora_A, adapter.lora_B)) for m, t in (("A", a), ("B", b))}


def merge_stage_states(specs: Sequence[AdapterSpec], states: Mapping[Tuple[int, int], Mapping[str, torch.Tensor]],
                       tp_size: int, stage_layers: Sequence[int], source=lambda tp, pp: f"rank ({tp}, {pp})"
                       ) -> Dict[str, torch.Tensor]:
    """The full adapter state from every (tp_rank, pp_rank) stage state (inverse of sharding by stage)."""
    full = {}
    for pp in range(len(stage_layers)):
        for local, spec in stage_specs(specs, stage_layers, pp).items():
            pieces = []
            for tp in range(tp_size):
                keys = [state_key(local, m, k) for k in range(len(spec.shapes)) for m in ("A", "B")]
                missing = [k for k in keys if k not in states[(tp, pp)]]
                if missing:
                    raise UserError(f"{source(tp, pp)}: no adapter {missing[0]} (saved with other "
                                    f"--lora-target-modules or pipeline split?)")
                pieces.append([states[(tp, pp)][k] for k in keys])
            full.update(merge(spec, pieces))
    check_shapes(specs, full, source(0, 0))
    return full


def check_shapes(specs: Sequence[AdapterSpec], full: Mapping[str, torch.Tensor], source: str) -> None:
    """Every full adapter tensor fits its linear ([r, in] / [out, r], one r): else the adapters were
    trained on another model."""
    rank = None
    for s in specs:
        for k, (rows, cols) in enumerate(s.shapes):
            a, b = tuple(full[s.a_name(k)].shape), tuple(full[s.b_name(k)].shape)
            rank = a[0] if rank is None else rank
            if a != (rank, cols) or b != (rows, rank):
                raise UserError(f"{source}: adapter {s.module} has shapes {list(a)} / {list(b)}, this model needs "
                                f"[{rank}, {cols}] / [{rows}, {rank}]: the adapters were trained on another model")
