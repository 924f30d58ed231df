"""Route megatron-core's direct CUDA calls to the CPU.

megatron-core assumes CUDA in many places: tensor factories with
``device='cuda'`` or ``device=torch.cuda.current_device()``, the CUDA RNG
state used by ``tensor_parallel.random``, streams, events, ``synchronize``
and the ``'torch.cuda.FloatTensor'`` strings its optimizer checks.  On a
machine without an accelerator we make ``torch.cuda`` answer with the CPU
equivalents, so the unmodified engine (parallel layers, schedules, DDP,
optimizers) runs on gloo processes.

Installed once by :func:`mindspeed_mm.platform.setup_platform` when the
device is the CPU; never on CUDA or NPU.  Must run before megatron-core is
imported, because megatron binds some of these names at import time.
"""
import contextlib
import functools
import time

import torch

_INSTALLED = False
CPU = torch.device("cpu")

# Tensor factories that megatron-core calls with a CUDA device.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn",
    "randint", "randperm", "empty_like", "zeros_like", "ones_like", "full_like",
    "rand_like", "randn_like", "empty_strided", "linspace", "eye",
)


def _is_accel(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int):
        return True  # a bare ordinal means a CUDA device to torch
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, str) and device.startswith("cuda")


def _route_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_accel(kwargs.get("device")):
            kwargs["device"] = CPU
        return fn(*args, **kwargs)

    return wrapper


def _route_to(orig_to):
    @functools.wraps(orig_to)
    def to(self, *args, **kwargs):
        if args and _is_accel(args[0]):
            args = (CPU,) + args[1:]
        if _is_accel(kwargs.get("device")):
            kwargs["device"] = CPU
        return orig_to(self, *args, **kwargs)

    return to


def _route_type(orig_type):
    # megatron's optimizers accept only 'torch.cuda.*Tensor' parameters.
    @functools.wraps(orig_type)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return orig_type(self, *args, **kwargs)
        name = orig_type(self)
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            name = "torch.cuda." + name[len("torch."):]
        return name

    return type_


class _Event:
    """Stand-in for torch.cuda.Event; timings use the host clock."""

    def __init__(self, enable_timing=False, **_):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0


class _Stream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered."""

    def __init__(self, *_, **__):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        event = event or _Event()
        event.record()
        return event

    def synchronize(self):
        pass


class _Generators:
    """``torch.cuda.default_generators[i]`` -> the CPU generator."""

    def __getitem__(self, idx):
        return torch.default_generator

    def __len__(self):
        return 1


def install() -> None:
    """Apply the CPU routing (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    cuda = torch.cuda

    for name in _FACTORIES:
        setattr(torch, name, _route_factory(getattr(torch, name)))
    torch.Tensor.to = _route_to(torch.Tensor.to)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _route_type(torch.Tensor.type)

    cuda.current_device = lambda: CPU
    cuda.set_device = lambda *a, **k: None
    cuda.device_count = lambda: 1
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda *a, **k: _Stream()
    cuda.default_stream = lambda *a, **k: _Stream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None

    # One RNG: the CUDA RNG state megatron forks for tensor-parallel dropout
    # is the CPU generator's state, so the tracker's fork/restore logic holds.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.default_generators = _Generators()
    # Without CUDA, torch queues lazy calls forever; run them now instead.
    cuda._lazy_call = lambda fn, *a, **k: fn()
    _INSTALLED = True


def installed() -> bool:
    return _INSTALLED
