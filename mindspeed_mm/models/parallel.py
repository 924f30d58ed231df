"""How the model is split: tensor / pipeline layout and activation recompute.

Pipeline stages hold a per-stage list of LLM layer counts.  The first stage
always holds the ViT, the projector and the word embedding and may hold no LLM
layer; the last holds the final norm and the output layer.  The guide gives the
split as ``pipeline_layer_index`` (the first LLM layer of every stage):
``[0, 0, 10, 20]`` over 28 layers means counts ``[0, 10, 10, 8]``
(:func:`stage_layer_counts` turns flags into counts).  The converter, training
and inference all read the split from here.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from mindspeed_mm.errors import UserError

RECOMPUTE_GRANULARITIES = (None, "full", "selective")
RECOMPUTE_METHODS = (None, "uniform", "block")


def check_stage_layers(stage_layers: Sequence[int], num_layers: int, what: str = None) -> List[int]:
    """The one rule for a pipeline split, shared by the converter, training and the model: non-negative
    LLM layer counts summing to ``num_layers``, and with PP > 1 the last stage (final norm, output
    layer, loss) holds at least one LLM layer.  ``what`` names the flag in the message."""
    counts = [int(c) for c in stage_layers]
    what = what or f"pipeline stage layers {counts}"
    if not counts or any(c < 0 for c in counts) or sum(counts) != num_layers:
        raise UserError(f"{what}: needs non-negative LLM layer counts per stage summing to "
                        f"{num_layers}, the model's LLM layers (got {counts})")
    if len(counts) > 1 and counts[-1] == 0:
        raise UserError(f"{what}: stage layers {counts}: the last pipeline stage must hold at least one "
                        f"LLM layer")
    return counts


def parse_int_list(values, flag: str) -> Optional[List[int]]:
    """Integers from either spelling: separate arguments (``0 0 10 20``), one comma list (``0,0,10,20``),
    or a mix (``[0, 0,10 20]``); None stays None."""
    if values is None:
        return None
    if isinstance(values, (str, int)):
        values = [values]
    parts = [p for v in values for p in str(v).replace(",", " ").strip().strip("[]").split() if p]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise UserError(f"{flag}: expected integers separated by spaces or commas, "
                        f"got {' '.join(map(str, values))!r}") from None


def stage_layer_counts(num_layers: int, pipeline_layer_index: Optional[Sequence[int]] = None,
                       pipeline_num_layers: Optional[Sequence[int]] = None) -> List[int]:
    """LLM layers per pipeline stage, checked by :func:`check_stage_layers`.

    ``pipeline_layer_index`` is the guide's form: the first LLM layer of each
    stage ([0, 0, 10, 20] with 28 layers -> [0, 10, 10, 8]);
    ``pipeline_num_layers`` gives the counts directly.  Either may also be a
    string, with spaces or commas.  Neither: one stage.
    """
    if pipeline_layer_index is not None and pipeline_num_layers is not None:
        raise UserError("give either --pipeline-layer-index or --pipeline-num-layers, not both")
    pipeline_layer_index = parse_int_list(pipeline_layer_index, "--pipeline-layer-index")
    pipeline_num_layers = parse_int_list(pipeline_num_layers, "--pipeline-num-layers")
    if pipeline_num_layers is not None:
        flag = f"--pipeline-num-layers {','.join(map(str, pipeline_num_layers))}"
        return check_stage_layers(pipeline_num_layers, num_layers, flag)
    if pipeline_layer_index is None:
        return [num_layers]
    starts = pipeline_layer_index
    flag = f"--pipeline-layer-index {','.join(map(str, starts))}"
    if not starts or starts[0] != 0:
        raise UserError(f"{flag}: the first stage must start at layer 0")
    if any(b < a for a, b in zip(starts, starts[1:])) or starts[-1] > num_layers:
        raise UserError(f"{flag}: start layers must be non-decreasing and at most num_layers = {num_layers}")
    return check_stage_layers([b - a for a, b in zip(starts, starts[1:] + [num_layers])], num_layers, flag)


def stage_offsets(stage_layers: Sequence[int]) -> List[int]:
    """Global index of each stage's first LLM layer."""
    out, total = [], 0
    for n in stage_layers:
        out.append(total)
        total += n
    return out


def megatron_layout(stage_layers: Sequence[int]) -> List[List[str]]:
    """megatron-core ``pipeline_model_parallel_layout``: embedding, decoder layers, loss, per stage."""
    last = len(stage_layers) - 1
    # Full LayerType names: megatron lower-cases list entries and looks them up by name.
    return [(["embedding"] if i == 0 else []) + ["decoder"] * n + (["loss"] if i == last else [])
            for i, n in enumerate(stage_layers)]


@dataclass(frozen=True)
class ParallelSettings:
    """Everything about the split and recompute the model needs to build one stage; checked on construction."""
    tensor_parallel: int = 1
    # LLM layers per pipeline stage; None = all layers in one stage (PP=1).
    stage_layers: Optional[List[int]] = None
    sequence_parallel: bool = False
    recompute_granularity: Optional[str] = None  # 'full' | 'selective'
    recompute_method: Optional[str] = None  # 'uniform' | 'block' (full only)
    recompute_num_layers: Optional[int] = None
    recompute_modules: List[str] = field(default_factory=lambda: ["core_attn"])  # selective only

    def __post_init__(self):
        self.validate()

    @property
    def pipeline_parallel(self) -> int:
        return 1 if self.stage_layers is None else len(self.stage_layers)

    def resolved_stage_layers(self, num_layers: int) -> List[int]:
        if self.stage_layers is None:
            return [num_layers]
        return check_stage_layers(self.stage_layers, num_layers)

    def validate(self) -> None:
        if self.tensor_parallel < 1:
            raise UserError(f"--tensor-model-parallel-size must be >= 1, got {self.tensor_parallel}")
        if self.recompute_granularity not in RECOMPUTE_GRANULARITIES:
            raise UserError(f"--recompute-granularity must be full or selective, "
                            f"got {self.recompute_granularity!r}")
        if self.recompute_method not in RECOMPUTE_METHODS:
            raise UserError(f"--recompute-method must be uniform or block, got {self.recompute_method!r}")
        if self.recompute_granularity == "full" and (self.recompute_method is None
                                                     or not self.recompute_num_layers):
            raise UserError("--recompute-granularity full needs --recompute-method (uniform|block) and "
                            "--recompute-num-layers >= 1")
        if self.recompute_granularity != "full" and self.recompute_method is not None:
            raise UserError("--recompute-method applies only with --recompute-granularity full")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise UserError("--sequence-parallel needs --tensor-model-parallel-size > 1")
