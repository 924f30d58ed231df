"""Collectives over a one-rank group are identities: megatron-core's DDP and distributed optimizer
issue them anyway (DP=1: the gradient buffer reduce-scattered into itself, the parameters gathered
from themselves).  On gloo each copies the whole buffer, ~150 ms a step for 18.5M parameters on 2
CPU cores, as much as the step's compute difference to HF.  The wrappers below skip those calls
(copying only when output and input are different memory); groups of more ranks go to torch as
before, so nothing changes for DP > 1.  Installed once, after megatron-core is imported."""
from __future__ import annotations

import contextlib
import functools

import torch

_INSTALLED = False


class _Done:
    """A finished work handle / coalescing manager: megatron may call wait() on it."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self) -> bool:
        return True


def _one_rank(group) -> bool:
    return torch.distributed.get_world_size(group) == 1


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.data_ptr() != src.data_ptr() or dst.shape != src.shape:
        dst.copy_(src.view_as(dst))


def _shortcut(collective):
    """reduce_scatter_tensor(output, input, ...) / all_gather_into_tensor(output, input, ...): on one
    rank output = input."""
    @functools.wraps(collective)
    def call(output, input, *args, group=None, async_op=False, **kwargs):
        if not _one_rank(group):
            return collective(output, input, *args, group=group, async_op=async_op, **kwargs)
        _copy(output, input)
        return _Done() if async_op else None
    return call


def _coalescing(manager):
    @functools.wraps(manager)
    def call(group=None, *args, **kwargs):
        if _one_rank(group):
            return contextlib.nullcontext(_Done())
        return manager(group, *args, **kwargs)
    return call


def install() -> None:
    """Wrap the names megatron-core's gradient / parameter buffers call (bound at their import)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.distributed import param_and_grad_buffer as buffers

    buffers.dist_reduce_scatter_func = _shortcut(buffers.dist_reduce_scatter_func)
    buffers.dist_all_gather_func = _shortcut(buffers.dist_all_gather_func)
    buffers._coalescing_manager = _coalescing(buffers._coalescing_manager)
    _INSTALLED = True
