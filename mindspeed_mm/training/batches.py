"""This data-parallel rank's micro-batches, moved to the device and padded as the flags say."""
import dataclasses
import os

import torch
from megatron.core import parallel_state as ps

from mindspeed_mm.data.builder import build_dataloader
from mindspeed_mm.data.workers import spare_cores
from mindspeed_mm.errors import UserError
from mindspeed_mm.training.config import TrainingConfig


def _worker_cores(device) -> int:
    """This process's spare cores for loader workers: the node's training processes (torchrun's
    LOCAL_WORLD_SIZE) share the cores, and on the CPU each one's torch threads compute on some."""
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 0
    return spare_cores(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), threads)


class Batches:
    """``packed``: micro-batches are rows of data_cfg.packing's packs (the held-out batches are not packed)."""

    def __init__(self, dataset, data_cfg, config: TrainingConfig, consumed_samples: int, device, log=print,
                 packed: bool = True):
        self.config, self.device = config, device
        b = config.batches
        dl = dataclasses.replace(data_cfg.dataloader_param, batch_size=b.micro_batch_size)
        data_cfg = dataclasses.replace(data_cfg, dataloader_param=dl)
        packing = data_cfg.packing if packed else None
        self.packed = packing is not None
        # Sequence parallelism splits the sequence over TP: a multiple of TP.
        multiple = config.parallel.tensor_model_parallel_size if config.parallel.sequence_parallel else None
        # Fixed shapes (no --variable-seq-lengths): every row padded to its capacity.
        fixed = b.micro_batch_size * packing.max_tokens if self.packed else b.seq_length
        try:
            loader = build_dataloader(dataset, data_cfg, consumed_samples=consumed_samples, seed=config.seed,
                                      dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                                      pad_to_multiple_of=multiple, min_length=0 if b.variable_seq_lengths else fixed,
                                      log=log, packing=packing, micro_batches=config.num_microbatches,
                                      worker_cores=_worker_cores(device))
        except ValueError as exc:  # fewer samples than one micro-batch per data-parallel rank
            raise UserError(f"{config.paths.mm_data}: {exc}") from None
        self.iterator = iter(loader)

    def next_global_batch(self):
        """The micro-batches of one iteration (prefetched: their real sizes give the FLOPs)."""
        return [self._prepare(next(self.iterator)) for _ in range(self.config.num_microbatches)]

    def _prepare(self, batch):
        s, b = batch["input_ids"].shape[1], self.config.batches
        if not b.variable_seq_lengths and not self.packed and s > b.seq_length:
            raise UserError(f"--seq-length {b.seq_length}: a micro-batch of {self.config.paths.mm_data} has {s} "
                            f"tokens; raise --seq-length, lower cutoff_len in the data JSON, or pass "
                            f"--variable-seq-lengths")
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}
