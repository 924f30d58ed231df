"""Route megatron-core's direct CUDA calls to the CPU.

megatron-core assumes CUDA in many places: tensor factories with
``device='cuda'`` or ``device=torch.cuda.current_device()``, the CUDA RNG
state used by ``tensor_parallel.random``, streams, events, ``synchronize``
and the ``'torch.cuda.FloatTensor'`` strings its optimizer checks.  On a
machine without an accelerator we make ``torch.cuda`` answer with the CPU
equivalents, so the unmodified engine (parallel layers, schedules, DDP,
optimizers) runs on gloo processes.

Installed once by :func:`mindspeed_mm.platform.setup_platform` when the
device is the CPU; never on CUDA or NPU.  megatron-core binds a few of these
names at import (``IMPORT_BINDINGS``): if it was imported first, install()
rebinds them, or stops with one error where it cannot.

Plain torch/transformers code must compute exactly what it computes without
the shim (tests/test_platform_shim_side_effects.py): the factory wrappers are
made known to torch's ``with torch.device(...)`` mode, which recognises
factories by identity.

Every ``torch.cuda`` name megatron-core uses is declared below: ``ROUTES``
(patched), ``HARMLESS`` or ``UNREACHABLE``; tests/test_platform_cuda_routes.py
checks that account against a scan of the installed megatron-core.
"""
import contextlib
import functools
import sys
import time

import torch

_INSTALLED = False
_ORIGINALS = {}  # dotted torch.cuda name -> the object ROUTES replaced
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


def _returns(value):
    # A new function per route: torch._dynamo keys its rules on these objects,
    # and one object under two torch.cuda names with different rules is an error.
    return lambda *a, **k: value


# One RNG: the CUDA RNG state megatron forks for tensor-parallel dropout is
# the CPU generator's state, so the tracker's fork/restore logic holds.
def _get_rng_state(device="cuda"):
    return torch.get_rng_state()


def _set_rng_state(state, device="cuda"):
    torch.set_rng_state(state)


def _manual_seed(seed):
    return torch.default_generator.manual_seed(int(seed))


# The torch.cuda names install() replaces: dotted name under torch.cuda -> CPU stand-in.
ROUTES = {
    "current_device": _returns(CPU),
    "set_device": _returns(None),
    "device_count": _returns(1),
    "synchronize": _returns(None),
    "empty_cache": _returns(None),
    "Stream": _Stream,
    "Event": _Event,
    "current_stream": lambda *a, **k: _Stream(),
    "default_stream": lambda *a, **k: _Stream(),
    "stream": lambda *a, **k: contextlib.nullcontext(),
    "memory_allocated": _returns(0),
    "memory_reserved": _returns(0),
    "nvtx.range_push": _returns(None),
    "nvtx.range_pop": _returns(None),
    "get_rng_state": _get_rng_state,
    "set_rng_state": _set_rng_state,
    "random.get_rng_state": _get_rng_state,
    "manual_seed": _manual_seed,
    "manual_seed_all": _manual_seed,  # torch.manual_seed calls it: seed the generator directly
    "default_generators": _Generators(),
    # Without CUDA, torch queues lazy calls forever; run them now instead.
    "_lazy_call": lambda fn, *a, **k: fn(),
}

# megatron-core modules that bind a routed name at import: (module, local name) -> route.
# If megatron was imported before install(), these still hold the unrouted torch.cuda
# objects (tensor_parallel.random's _lazy_call would queue the RNG tracker's state
# switches forever: dropout on the wrong stream, no error); install() rebinds them.
# tests/test_platform_cuda_routes.py checks this table against a scan of megatron-core.
IMPORT_BINDINGS = {
    ("megatron.core.tensor_parallel.random", "_lazy_call"): "_lazy_call",
    ("megatron.core.distributed.fsdp.src.megatron_fsdp.utils", "_lazy_call"): "_lazy_call",
    ("megatron.core.inference.engines.dynamic_engine", "range_push"): "nvtx.range_push",
    ("megatron.core.inference.engines.dynamic_engine", "range_pop"): "nvtx.range_pop",
}

# Routed although megatron-core never names them: torch's own code calls them
# (name -> the torch file that does, checked by the test).
TORCH_CALLERS = {"manual_seed_all": "random.py"}

# The rest of megatron-core's torch.cuda names, and why each is safe unpatched.
# tests/test_platform_cuda_routes.py scans the installed megatron-core: a name
# missing from ROUTES/HARMLESS/UNREACHABLE, or an entry it no longer uses, fails.
HARMLESS = {  # usable on the CPU as torch ships it
    "is_available": "gates optional CUDA extras only (TE fp8 types, triton fusions, offload, telemetry)",
    "FloatTensor": "legacy type class, only in isinstance tuples",
    "HalfTensor": "legacy type class, only in isinstance tuples",
    "BFloat16Tensor": "legacy type class, only in isinstance tuples",
    "OutOfMemoryError": "exception class, only caught",
    "amp.custom_fwd": "autograd decorator, no casting without cast_inputs",
    "amp.custom_bwd": "autograd decorator, no casting",
    "memory_stats": "an empty dict while CUDA is uninitialised (dynamic engine, CUDA graphs only)",
    # bound at import by inference.unified_memory, which inference.contexts (generate.py) imports
    "memory.MemPool": "class, used only by the dynamic engine's unified memory",
    "memory.CUDAPluggableAllocator": "class, used only by the dynamic engine's unified memory",
    "MemPool": "class, used only by the dynamic engine's unified memory and nccl_ub",
}
UNREACHABLE = {  # on no path this project runs
    "_lazy_init": "only CUDA-graph-safe RNG (use_cudagraphable_rng) and megatron FSDP",
    "device": "only the old-torch branch of _set_cuda_rng_state (torch._C._cuda_setRNGState) and megatron FSDP",
    "CUDAGraph": "only CUDA graphs (cuda_graph_impl, use_cudagraphable_rng)",
    "graph": "only CUDA graphs (transformer/cuda_graphs.py, full_cuda_graph.py)",
    "graph_pool_handle": "only CUDA graphs (transformer/cuda_graphs.py)",
    "get_device_capability": "only CUDA graphs (transformer/cuda_graphs.py)",
    "set_stream": "only CUDA graphs (transformer/cuda_graphs.py)",
    "get_device_properties": "only TE inference layers, batch-invariant kernels and megatron FSDP",
    "use_mem_pool": "only the dynamic inference context and NCCL user buffers (nccl_ub)",
    "ExternalStream": "only the NVSHMEM resharding service",
    "nvtx.range": "only MoE fine-grained callables (combined 1F1B overlap)",
    "clock_rate": "only the StragglerDetector's GPU telemetry (pynvml)",
    "power_draw": "only the StragglerDetector's GPU telemetry (pynvml)",
    "temperature": "only the StragglerDetector's GPU telemetry (pynvml)",
    "utilization": "only the StragglerDetector's GPU telemetry (pynvml)",
}


def _resolve(dotted: str):
    """(owner, attribute) of a dotted name under torch.cuda."""
    owner = torch.cuda
    *path, attr = dotted.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, attr


class ImportOrderError(RuntimeError):
    """megatron-core was imported before the shim and holds a torch.cuda name install() cannot rebind."""


def _rebind_imported(originals: dict) -> None:
    """Point megatron modules imported before install() at the routes (see IMPORT_BINDINGS)."""
    for (module, local), dotted in IMPORT_BINDINGS.items():
        mod = sys.modules.get(module)
        if mod is None or not hasattr(mod, local):  # not imported yet: it binds the route itself
            continue
        value = getattr(mod, local)
        if value is originals[dotted]:
            setattr(mod, local, ROUTES[dotted])
        elif value is not ROUTES[dotted]:
            raise ImportOrderError(
                f"{module}.{local} is {value!r}, neither torch.cuda.{dotted} nor its CPU route, so the CPU "
                f"shim cannot rebind it: call setup_platform('cpu') before importing megatron-core")
    # A binding the table lacks (a megatron upgrade): fail here, not with silently wrong RNG streams.
    # Functions and classes only: an empty tuple (default_generators on a CPU build) is shared by all.
    unrouted = {id(v): d for d, v in originals.items() if callable(v)}
    stale = sorted(f"{name}.{attr} (torch.cuda.{unrouted[id(v)]})"
                   for name, mod in list(sys.modules.items())
                   if name.split(".")[0] == "megatron" and mod is not None
                   for attr, v in list(vars(mod).items()) if id(v) in unrouted and v is originals[unrouted[id(v)]])
    if stale:
        raise ImportOrderError(f"megatron-core was imported before the CPU shim and binds {', '.join(stale)}, "
                               "which cpu_adapter.IMPORT_BINDINGS does not list: call setup_platform('cpu') "
                               "before importing megatron-core (and add the binding to IMPORT_BINDINGS)")


def _device_mode_constructors() -> set:
    """The factories ``with torch.device(d)`` / set_default_device recognise, by identity, in a
    set built once from the torch.* attributes.  Built after the patch it would hold only the
    wrappers while the mode is handed the originals: factories would ignore the device context
    (transformers' from_pretrained builds on 'meta', then keeps uninitialised rotary buffers:
    NaN or slightly-off losses).  Call before patching; install() adds the wrappers."""
    from torch.utils import _device

    return _device._device_constructors()


def install() -> None:
    """Apply the CPU routing (idempotent); rebind megatron modules imported before it."""
    global _INSTALLED
    if not _INSTALLED:
        _ORIGINALS.update({dotted: getattr(*_resolve(dotted)) for dotted in ROUTES})
        constructors = _device_mode_constructors()  # from the originals
        for name in _FACTORIES:
            original = getattr(torch, name)
            setattr(torch, name, _route_factory(original))
            if original in constructors:  # both identities are factories to the device mode
                constructors.add(getattr(torch, name))
        torch.Tensor.to = _route_to(torch.Tensor.to)
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.Tensor.type = _route_type(torch.Tensor.type)
        for dotted, replacement in ROUTES.items():
            setattr(*_resolve(dotted), replacement)
        _INSTALLED = True
    _rebind_imported(_ORIGINALS)  # every call: an ImportOrderError stays one until fixed


def installed() -> bool:
    return _INSTALLED
