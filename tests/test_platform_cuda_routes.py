"""Every ``torch.cuda`` name the installed megatron-core uses is accounted for by the CPU shim.

The scan reads megatron-core's sources with ``ast`` (nothing is imported):
attribute chains ``torch.cuda.X[.Y]``, aliases (``import torch.cuda.nvtx as
nvtx``, ``from torch import cuda``) and ``from torch.cuda import X``.  Each name
must be in ``cpu_adapter.ROUTES`` (patched), ``HARMLESS`` or ``UNREACHABLE``;
an account entry megatron no longer uses fails too, so a megatron upgrade is
caught here; so is a change to the names megatron binds at import
(``IMPORT_BINDINGS``).  The routes are then exercised for real in fresh
processes: the platform set up before megatron is imported, as the entry points
do, and after (as pytest collection may), where install() rebinds them.
"""
import ast
import functools
import importlib.util
import os
import types

import torch

from mindspeed_mm.platform import cpu_adapter
from tests.multiproc import run_ranks


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)  # megatron is a namespace package: nothing runs
    return os.path.dirname(spec.origin)


def _cuda_name(parts) -> str:
    """The name under torch.cuda: descend through submodules, stop at the first other object."""
    obj, name = torch.cuda, []
    for part in parts:
        name.append(part)
        obj = getattr(obj, part, None)
        if not isinstance(obj, types.ModuleType):
            break
    return ".".join(name)


def _scan_file(path: str):
    """({name under torch.cuda}, {(local name, name) bound by a module-level from-import})."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    aliases = {"torch": ("torch",)}  # local name -> the module path it stands for
    names, bound = set(), set()
    top_level = {id(n) for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}

    def use(full):
        if full and full[:2] == ("torch", "cuda") and len(full) > 2:
            names.add(_cuda_name(full[2:]))

    def chain(node):
        """('torch', 'cuda', 'X', ...) for an attribute chain rooted at a known alias, else None."""
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in aliases:
            return aliases[node.id] + tuple(reversed(parts))
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name.split(".")[0] == "torch":
                    aliases[a.asname] = tuple(a.name.split("."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch":
            for a in node.names:
                full = tuple(node.module.split(".")) + (a.name,)
                aliases[a.asname or a.name] = full
                # `from torch.cuda import nvtx` names a module: its uses are counted below
                if full[:2] == ("torch", "cuda") and len(full) > 2 and \
                        not isinstance(_resolve(full), types.ModuleType):
                    use(full)
                    if id(node) in top_level:
                        bound.add((a.asname or a.name, ".".join(full[2:])))
    children = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in children:  # the longest chain only
            use(chain(node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "hasattr") and len(node.args) >= 2 and \
                isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            base = chain(node.args[0])  # getattr(torch.cuda, "X")
            use(base + (node.args[1].value,) if base else None)
    return names, bound


def _resolve(full):
    obj = torch
    for part in full[1:]:
        obj = getattr(obj, part, None)
    return obj


@functools.lru_cache(maxsize=None)
def _scan(package: str, files=None):
    """{name: [files using it]} and [(module, local name, name)] for names bound at import."""
    root = _package_dir(package)
    uses, bound = {}, []
    paths = [os.path.join(root, f) for f in files] if files else [
        os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py")]
    for path in sorted(paths):
        rel = os.path.relpath(path, root)
        module = ".".join([package, *rel[:-len(".py")].split(os.sep)]).removesuffix(".__init__")
        names, imports = _scan_file(path)
        for name in names:
            uses.setdefault(name, []).append(module)
        bound += [(module, local, name) for local, name in imports]
    return uses, bound


def _megatron_uses():
    return _scan("megatron.core")[0]


def test_scan_sees_the_known_uses():
    """The scanner itself: chains, nested chains and from-imports are all found."""
    uses, bound = _scan("megatron.core")
    for name in ("current_device", "nvtx.range_push", "random.get_rng_state", "amp.custom_fwd", "_lazy_call"):
        assert name in uses, name
    assert "megatron.core.tensor_parallel.random" in uses["_lazy_call"]
    assert ("megatron.core.tensor_parallel.random", "_lazy_call", "_lazy_call") in bound


def test_every_megatron_cuda_name_is_accounted_for():
    accounts = [set(cpu_adapter.ROUTES) - set(cpu_adapter.TORCH_CALLERS), set(cpu_adapter.HARMLESS),
                set(cpu_adapter.UNREACHABLE)]
    for i, a in enumerate(accounts):
        for b in accounts[i + 1:]:
            assert not a & b, f"accounted twice: {sorted(a & b)}"
    accounted = set().union(*accounts)
    uses = _megatron_uses()
    missing = {name: files[:3] for name, files in uses.items() if name not in accounted}
    assert not missing, ("torch.cuda names megatron-core uses with no account in cpu_adapter "
                         f"(route them, or say why they are harmless or unreachable): {missing}")
    stale = sorted(accounted - set(uses))
    assert not stale, f"cpu_adapter accounts for names megatron-core no longer uses: {stale}"
    for table in (cpu_adapter.HARMLESS, cpu_adapter.UNREACHABLE):
        assert all(isinstance(r, str) and r.strip() for r in table.values())


def test_torch_callers_still_call():
    """Routes megatron never names are kept only while torch's own code calls them."""
    for name, file in cpu_adapter.TORCH_CALLERS.items():
        assert name in cpu_adapter.ROUTES and name not in _megatron_uses(), name
        uses, _ = _scan("torch", (file,))
        assert name in uses, f"torch/{file} no longer calls torch.cuda.{name}: drop the route"


# Each route exercised the way megatron-core uses it (after setup_platform("cpu")).
def _devices():
    assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    torch.cuda.set_device(0)
    assert torch.cuda.device_count() == 1


def _streams_and_events():
    stream = torch.cuda.Stream(device=torch.cuda.current_device())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.default_stream().wait_stream(stream)
    with torch.cuda.stream(stream):
        torch.ones(4).sum()
    stream.wait_event(start)
    stream.record_event().wait(torch.cuda.current_stream())
    end.record()
    end.synchronize()
    stream.synchronize()
    torch.cuda.synchronize()
    assert start.query() and end.elapsed_time(end) == 0.0 and start.elapsed_time(end) >= 0.0


def _memory_and_nvtx():
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() == 0 and torch.cuda.memory_reserved() == 0
    torch.cuda.nvtx.range_push("step")
    torch.cuda.nvtx.range_pop()


def _rng():
    torch.cuda.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)  # through torch.cuda.manual_seed_all
    assert torch.equal(torch.rand(3), a)
    state = torch.cuda.get_rng_state()
    assert torch.equal(state, torch.get_rng_state()) and torch.equal(torch.cuda.random.get_rng_state(), state)
    b = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), b)
    assert torch.cuda.default_generators[0] is torch.default_generator
    ran = []
    torch.cuda._lazy_call(lambda: ran.append(1))
    assert ran == [1]


_ROUTE_PROBES = {
    _devices: ("current_device", "set_device", "device_count"),
    _streams_and_events: ("Stream", "Event", "current_stream", "default_stream", "stream", "synchronize"),
    _memory_and_nvtx: ("empty_cache", "memory_allocated", "memory_reserved", "nvtx.range_push", "nvtx.range_pop"),
    _rng: ("manual_seed", "manual_seed_all", "get_rng_state", "random.get_rng_state", "set_rng_state",
           "default_generators", "_lazy_call"),
}


def _harmless():
    assert isinstance(torch.cuda.is_available(), bool)
    cpu = torch.zeros(1)
    assert not isinstance(cpu, (torch.cuda.FloatTensor, torch.cuda.HalfTensor, torch.cuda.BFloat16Tensor))
    assert issubclass(torch.cuda.OutOfMemoryError, BaseException)

    class Double(torch.autograd.Function):
        @staticmethod
        @torch.cuda.amp.custom_fwd
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        @torch.cuda.amp.custom_bwd
        def backward(ctx, grad):
            return 2 * grad

    x = torch.ones(2, requires_grad=True)
    Double.apply(x).sum().backward()
    assert x.grad.tolist() == [2.0, 2.0]
    assert isinstance(torch.cuda.memory_stats(), dict)
    assert all(isinstance(c, type) for c in (torch.cuda.MemPool, torch.cuda.memory.MemPool,
                                             torch.cuda.memory.CUDAPluggableAllocator))


_HARMLESS_PROBED = ("is_available", "FloatTensor", "HalfTensor", "BFloat16Tensor", "OutOfMemoryError",
                    "amp.custom_fwd", "amp.custom_bwd", "memory_stats", "MemPool", "memory.MemPool",
                    "memory.CUDAPluggableAllocator")


def _megatron_on_cpu(bound):
    """megatron's own users of the routes: names bound at import, and the RNG tracker through them."""
    import importlib

    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    stale_bindings = []
    for module, local, name in bound:
        if name in cpu_adapter.ROUTES:
            owner, attr = cpu_adapter._resolve(name)
            value = getattr(importlib.import_module(module), local, None)  # None: not bound at import
            if value is not None and value is not getattr(owner, attr):
                stale_bindings.append(f"{module}.{local}")
    assert not stale_bindings, f"bound to the unrouted torch.cuda object (imported before the shim?): {stale_bindings}"

    # fork() swaps the "CUDA" state (the CPU generator here) in and out through the
    # _lazy_call bound at import: with megatron imported before the shim both checks fail.
    tracker = CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    outside = torch.rand(2)
    torch.manual_seed(0)
    with tracker.fork("model-parallel-rng"):
        inside = torch.rand(2)
    assert torch.equal(inside, torch.rand(2, generator=torch.Generator().manual_seed(123)))
    assert torch.equal(torch.rand(2), outside)


def _exercise_on_cpu(rank, world, bound):
    """In a fresh process: platform first, then megatron, as the entry points do."""
    from mindspeed_mm.platform import setup_platform

    setup_platform("cpu")
    failures = []
    for probe in [*_ROUTE_PROBES, _harmless, functools.partial(_megatron_on_cpu, bound)]:
        try:
            probe()
        except Exception as exc:  # name every broken probe, not just the first
            failures.append(f"{getattr(probe, '__name__', None) or probe.func.__name__}: {type(exc).__name__}: {exc}")
    return failures


def test_routes_work_on_cpu():
    probed = [name for names in _ROUTE_PROBES.values() for name in names]
    assert sorted(probed) == sorted(cpu_adapter.ROUTES), "every route needs a probe in _ROUTE_PROBES"
    assert sorted(_HARMLESS_PROBED) == sorted(cpu_adapter.HARMLESS), "every harmless name needs a check"
    (failures,) = run_ranks(_exercise_on_cpu, 1, timeout=120, bound=_scan("megatron.core")[1])
    assert not failures, "\n".join(failures)


def test_import_bindings_match_megatron():
    """cpu_adapter.IMPORT_BINDINGS is exactly the routed names megatron-core binds at import."""
    bound = {(module, local): name for module, local, name in _scan("megatron.core")[1] if name in cpu_adapter.ROUTES}
    assert cpu_adapter.IMPORT_BINDINGS == bound


def _tracker_streams():
    """Draws outside and inside the tracker's fork() after model_parallel_cuda_manual_seed."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    before = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    after = torch.rand(4)
    return before, inside, after


def _megatron_imported_first(rank, world, bound):
    """In a fresh process: megatron first (as pytest collection may), then the platform."""
    import importlib

    for module, _ in cpu_adapter.IMPORT_BINDINGS:
        importlib.import_module(module)
    from mindspeed_mm.platform import setup_platform

    setup_platform("cpu")
    failures = []
    for probe in [*_ROUTE_PROBES, _harmless, functools.partial(_megatron_on_cpu, bound)]:
        try:
            probe()
        except Exception as exc:
            failures.append(f"{getattr(probe, '__name__', None) or probe.func.__name__}: {type(exc).__name__}: {exc}")
    before, inside, after = _tracker_streams()
    torch.manual_seed(123)  # the default stream model_parallel_cuda_manual_seed set
    default = torch.rand(12)
    if torch.equal(inside, default[4:8]):
        failures.append("fork() did not switch to the tracker's stream")
    if not (torch.equal(before, default[:4]) and torch.equal(after, default[4:8])):
        failures.append("fork() did not restore the default stream")
    again = _tracker_streams()
    if not all(torch.equal(a, b) for a, b in zip(again, (before, inside, after))):
        failures.append("tracker streams not reproducible after model_parallel_cuda_manual_seed")
    return failures


def test_megatron_imported_before_the_shim_is_rebound():
    (failures,) = run_ranks(_megatron_imported_first, 1, timeout=120, bound=_scan("megatron.core")[1])
    assert not failures, "\n".join(failures)


def _unrebindable(rank, world):
    """A binding install() cannot fix is one clear error, also on a second call."""
    import sys

    import megatron.core.tensor_parallel.random as tp_random

    from mindspeed_mm.platform import cpu_adapter as adapter

    errors = []
    tp_random._lazy_call = foreign = lambda fn: None
    for _ in range(2):
        try:
            adapter.install()
            errors.append(None)
        except adapter.ImportOrderError as exc:
            errors.append(str(exc))
    assert tp_random._lazy_call is foreign
    tp_random._lazy_call = adapter._ORIGINALS["_lazy_call"]
    # a binding IMPORT_BINDINGS lacks (a megatron upgrade): named, not silently left unrouted
    fake = type(sys)("megatron.core.fake_upgrade")
    fake.synchronize = adapter._ORIGINALS["synchronize"]
    sys.modules[fake.__name__] = fake
    try:
        adapter.install()
        errors.append(None)
    except adapter.ImportOrderError as exc:
        errors.append(str(exc))
    del sys.modules[fake.__name__]
    adapter.install()
    assert tp_random._lazy_call is torch.cuda._lazy_call
    return errors


def test_unrebindable_binding_is_one_clear_error():
    (errors,) = run_ranks(_unrebindable, 1, timeout=120)
    assert all(e and "setup_platform('cpu') before importing megatron-core" in e for e in errors), errors
    assert "megatron.core.tensor_parallel.random._lazy_call" in errors[0] and errors[0] == errors[1]
    assert "megatron.core.fake_upgrade.synchronize (torch.cuda.synchronize)" in errors[2]
