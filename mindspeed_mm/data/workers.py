"""How many worker processes to start: never more than there is work or than usable cores."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as torch's DataLoader counts them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)


def effective_workers(requested: int, work_items: int) -> int:
    """`requested` capped by `work_items` and by usable_cores(); 0 stays 0 (work in-process).
    Extra workers only cost start-up time (each loads the tokenizer, imports torch)."""
    if requested <= 0:
        return 0
    return max(1, min(requested, work_items, usable_cores()))
