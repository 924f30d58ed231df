"""How many worker processes to start: never more than there is work or than cores to run them on."""

from __future__ import annotations

from mindspeed_mm.host import usable_cores


def spare_cores(local_processes: int = 1, computing_threads: int = 0) -> int:
    """Cores one of `local_processes` training processes on this node can give its loader workers: its
    share of the usable cores left after every process's `computing_threads` (its torch threads when it
    trains on the CPU; 0 on an accelerator).  0 means: load in the training process.  A worker on a core
    the computation uses slows the computation down and adds the hand-over between processes (measured on
    2 cores: ~25 ms per micro-batch for ~1 ms of loading)."""
    local = max(1, local_processes)
    return max(0, usable_cores() - max(0, computing_threads) * local) // local


def effective_workers(requested: int, work_items: int, cores: int | None = None) -> int:
    """`requested` capped by `work_items` and by `cores` (default: usable_cores()); 0 stays 0 (work
    in-process), and so does a request with no core to run on.  Extra workers only cost start-up time
    (each loads the tokenizer, imports torch)."""
    cores = usable_cores() if cores is None else cores
    if requested <= 0 or cores <= 0:
        return 0
    return max(1, min(requested, work_items, cores))
