"""megatron-core's tensor-parallel linears, short-circuited where they have nothing to do.

With one tensor-parallel rank, no sequence parallelism and no fused weight-gradient accumulation,
megatron's ``ColumnParallelLinear`` / ``RowParallelLinear`` still route every call through two
identity communication functions and a custom autograd function (``LinearWithGradAccumulation...``)
whose backward is plain autograd's.  ``F.linear`` computes the same (HF's ``nn.Linear`` math: the bias
fused into the matmul) and the gradient reaches megatron DDP's ``main_grad`` through the same
AccumulateGrad hook as every other parameter.  On a small model on a CPU that saves ~10% of a step
(scripts/bench_launcher.py); anything else (TP > 1, sequence parallel, fused wgrad) runs megatron's
code unchanged.  Parameters, names, initialisation and checkpoints are megatron's.
"""
from typing import Optional

import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.utils import get_pg_size


class _PlainAtTP1:
    """``plain``: True when megatron's forward would reduce to F.linear for this layer (decided once)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.plain = (get_pg_size(self.tp_group) == 1 and not self.sequence_parallel
                      and not self.gradient_accumulation_fusion and not self.is_expert
                      and not c.defer_embedding_wgrad_compute and not c.cpu_offloading)


class ColumnLinear(_PlainAtTP1, ColumnParallelLinear):
    """ColumnParallelLinear; a plain F.linear when ``plain``."""

    def forward(self, input_, weight=None, runtime_gather_output: Optional[bool] = None):
        w = self.weight if weight is None else weight
        if not self.plain or w is None or tuple(w.shape) != (self.output_size_per_partition, self.input_size):
            return super().forward(input_, weight, runtime_gather_output)  # or megatron's error
        if self.skip_bias_add:
            return F.linear(input_, w), self.bias
        return F.linear(input_, w, self.bias), None


class RowLinear(_PlainAtTP1, RowParallelLinear):
    """RowParallelLinear; a plain F.linear when ``plain``."""

    def forward(self, input_):
        if not self.plain:
            return super().forward(input_)
        if self.skip_bias_add:
            return F.linear(input_, self.weight), self.bias
        return F.linear(input_, self.weight, self.bias), None
