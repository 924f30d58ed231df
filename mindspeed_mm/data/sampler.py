"""Deterministic, data-parallel, resumable batch sampling.

The global order of epoch e is a permutation seeded by (seed, e) (or 0..n-1 without
shuffle). Each global step takes `micro_batch_size * dp_size` consecutive entries of it;
data-parallel rank r takes its `micro_batch_size` slice. Everything is a pure function of
`consumed_samples` (global samples already trained on), so a resumed run continues
exactly where the interrupted one stopped.
"""

from __future__ import annotations

import numpy as np


def shuffled_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Epoch ``epoch``'s order of ``num_samples`` samples: a permutation seeded by (seed, epoch)."""
    if shuffle:
        return np.random.default_rng([seed, epoch]).permutation(num_samples)
    return np.arange(num_samples)


class ResumableBatchSampler:
    def __init__(self, num_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, shuffle: bool = True, seed: int = 1234, drop_last: bool = True):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside data-parallel size {dp_size}")
        self.global_batch = micro_batch_size * dp_size
        if num_samples < (self.global_batch if drop_last else 1):
            raise ValueError(f"{num_samples} usable samples, fewer than one micro-batch on every "
                             f"data-parallel rank ({micro_batch_size} x {dp_size})")
        self.num_samples, self.micro_batch_size = num_samples, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples, self.shuffle, self.seed, self.drop_last = consumed_samples, shuffle, seed, drop_last
        # Samples per epoch: whole global batches; without drop_last the tail is topped up
        # with the first entries of the same epoch's order.
        full, rest = divmod(num_samples, self.global_batch)
        self.samples_per_epoch = (full + (rest > 0 and not drop_last)) * self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        order = shuffled_order(self.num_samples, self.seed, epoch, self.shuffle)
        if self.samples_per_epoch > self.num_samples:
            order = np.resize(order, self.samples_per_epoch)  # repeats from the start
        return order[: self.samples_per_epoch]

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.samples_per_epoch // self.global_batch

    def __iter__(self):
        """Endless: epochs follow each other; the training loop decides when to stop."""
        consumed = self.consumed_samples
        while True:
            epoch, offset = divmod(consumed, self.samples_per_epoch)
            order = self.epoch_order(epoch)
            start = offset - offset % self.global_batch  # a partly consumed step restarts
            for step in range(start, self.samples_per_epoch, self.global_batch):
                lo = step + self.dp_rank * self.micro_batch_size
                yield order[lo: lo + self.micro_batch_size].tolist()
                consumed = (epoch * self.samples_per_epoch) + step + self.global_batch
