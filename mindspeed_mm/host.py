"""Facts about the host every room may ask without importing torch (the conversion's byte paths do not)."""

import os


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as torch's DataLoader counts them)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity (macOS)
        return max(1, os.cpu_count() or 1)
