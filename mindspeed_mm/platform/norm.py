"""LayerNorm / RMSNorm for megatron-core layer specs.

megatron's ``WrappedTorchNorm`` refuses sequence parallelism; this one marks
its parameters ``sequence_parallel`` so megatron all-reduces their gradients
across the tensor-parallel group, and uses torch_npu's fused RMSNorm on NPU.
"""
import torch

from mindspeed_mm.platform import current_platform


class _NpuRMSNorm(torch.nn.RMSNorm):
    def forward(self, x):
        import torch_npu

        return torch_npu.npu_rms_norm(x, self.weight, epsilon=self.eps)[0]


class Norm:
    """Factory with megatron's norm signature: ``Norm(config, hidden_size, eps)``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        if config.normalization == "RMSNorm":
            norm_cls = _NpuRMSNorm if current_platform().device_type == "npu" else torch.nn.RMSNorm
        elif config.normalization == "LayerNorm":
            norm_cls = torch.nn.LayerNorm
        else:
            raise ValueError(f"unsupported normalization '{config.normalization}'")
        norm = norm_cls(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm
