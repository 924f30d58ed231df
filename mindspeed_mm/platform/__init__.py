"""The one place that knows about devices: NPU, CUDA or CPU.

Call :func:`setup_platform` before importing megatron-core (it has to patch
``torch.cuda`` on the CPU and load ``torch_npu`` on Ascend; on the CPU a megatron
imported first is rebound, see ``cpu_adapter.IMPORT_BINDINGS``).  Everything else
asks :func:`current_platform` instead of probing devices itself.
"""
import importlib
import os
from dataclasses import dataclass

import torch

from mindspeed_mm.errors import UserError

from . import cpu_adapter

DEVICES = ("npu", "cuda", "cpu")
BACKENDS = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}


class PlatformError(UserError):
    """A device request that this machine cannot satisfy (printed as one line)."""


@dataclass(frozen=True)
class Platform:
    device_type: str  # 'npu' | 'cuda' | 'cpu'
    backend: str  # torch.distributed backend

    @property
    def is_cpu(self) -> bool:
        return self.device_type == "cpu"

    @property
    def fused_torch_adam(self) -> bool:
        """Whether megatron's fallback optimizer (torch's AdamW, without Transformer Engine / Apex) should
        run torch's fused kernel: on the CPU, where torch's default is a per-tensor Python loop (~4 ms of
        a 50 ms step of a tiny model; scripts/bench_launcher.py).  Accelerators get TE's / Apex's."""
        return self.is_cpu

    def device(self, local_rank: int = 0) -> torch.device:
        if self.is_cpu:
            return torch.device("cpu")
        return torch.device(self.device_type, local_rank)

    def set_device(self, local_rank: int) -> None:
        if self.device_type == "cuda":
            torch.cuda.set_device(local_rank)
        elif self.device_type == "npu":
            torch.npu.set_device(local_rank)


_PLATFORM = None


def _npu_available() -> bool:
    try:
        importlib.import_module("torch_npu")
    except ImportError:
        return False
    return True


def _setup_npu() -> None:
    import torch_npu  # noqa: F401  registers the 'npu' device
    from torch_npu.contrib import transfer_to_npu  # noqa: F401  maps torch.cuda.* to the NPU

    try:  # MindSpeed's megatron adaptor: fused kernels, when installed
        importlib.import_module("mindspeed.megatron_adaptor")
    except ImportError:
        pass


def detect_device(requested: str = None) -> str:
    """Resolve 'auto'/None to npu > cuda > cpu; validate an explicit request."""
    requested = (requested or os.environ.get("MM_DEVICE") or "auto").lower()
    if requested == "auto":
        if _npu_available():
            return "npu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in DEVICES:
        raise PlatformError(f"unknown device '{requested}': choose one of auto, {', '.join(DEVICES)}")
    if requested == "npu" and not _npu_available():
        raise PlatformError("--device npu requested but torch_npu is not installed (pip install torch_npu)")
    if requested == "cuda" and not torch.cuda.is_available():
        raise PlatformError("--device cuda requested but torch.cuda.is_available() is False "
                            "(no NVIDIA GPU or a CPU-only torch build)")
    return requested


def setup_platform(device: str = None, backend: str = None) -> Platform:
    """Choose the device once per process and prepare torch for it."""
    global _PLATFORM
    device_type = detect_device(device)
    if _PLATFORM is not None:
        if _PLATFORM.device_type != device_type:
            raise PlatformError(f"platform already set up for {_PLATFORM.device_type}, cannot switch to {device_type}")
        return _PLATFORM
    if device_type == "npu":
        _setup_npu()
    elif device_type == "cpu":
        cpu_adapter.install()
    _PLATFORM = Platform(device_type, backend or BACKENDS[device_type])
    return _PLATFORM


def current_platform() -> Platform:
    """The platform chosen by setup_platform (auto-detected on first use)."""
    return _PLATFORM if _PLATFORM is not None else setup_platform()
