"""Process groups: torch.distributed + megatron-core parallel state, set up in one place.

Import after :func:`mindspeed_mm.platform.setup_platform` (megatron-core is imported here).
"""
import dataclasses
import os
from datetime import timedelta

import torch
from megatron.core import parallel_state, tensor_parallel as mcore_tp

from mindspeed_mm.errors import UserError
from mindspeed_mm.platform import single_rank


def init_distributed(platform, tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 1234,
                     pipeline_layout=None, timeout_minutes: int = 30):
    """Initialise torch.distributed from torchrun's environment and megatron's groups.

    Works single-process too (WORLD_SIZE unset): a one-rank group keeps the
    code path identical to a real launch.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"world size {world} is not divisible by TP {tensor_parallel} x PP {pipeline_parallel}")
    platform.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(platform.backend, rank=rank, world_size=world,
                                             timeout=timedelta(minutes=timeout_minutes))
    single_rank.install()  # DP=1: megatron's buffer collectives over one rank are skipped
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel)
    # Same seed on the data-parallel replicas, distinct tensor-parallel streams.
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    mcore_tp.model_parallel_cuda_manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    return rank, world


def destroy_distributed():
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def with_backend(platform, requested):
    """The platform speaking --distributed-backend, mapped to what the device speaks (the guide
    passes nccl on NPUs); None keeps the device's own."""
    if requested is None or requested == platform.backend:
        return platform
    if platform.device_type == "npu" and requested == "nccl":
        return dataclasses.replace(platform, backend="hccl")
    raise UserError(f"--distributed-backend {requested} does not work on the {platform.device_type} "
                    f"device (use {platform.backend}, or leave the flag out)")
