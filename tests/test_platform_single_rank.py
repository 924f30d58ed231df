"""Collectives over a one-rank group are skipped (platform/single_rank.py), with the result the collective
gives: the output equals the input, aliasing or not; async handles are finished."""
import torch

from tests.multiproc import run_ranks


def _check(rank, world):
    from megatron.core.distributed import param_and_grad_buffer as buffers

    from mindspeed_mm.platform import setup_platform
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed

    init_distributed(setup_platform("cpu"), 1, 1)
    try:
        for fn in (buffers.dist_reduce_scatter_func, buffers.dist_all_gather_func):
            buffer = torch.arange(6.0)
            assert fn(buffer, buffer, group=None) is None  # DP=1: shard == whole buffer, nothing to do
            assert torch.equal(buffer, torch.arange(6.0))
            out = torch.zeros(6)
            handle = fn(out, torch.arange(6.0), group=None, async_op=True)
            assert torch.equal(out, torch.arange(6.0)) and handle.wait()
        with buffers._coalescing_manager(None, async_ops=True) as cm:
            pass
        assert cm.wait()
    finally:
        destroy_distributed()


def test_one_rank_collectives_are_identities():
    run_ranks(_check, 1, timeout=120)
