"""Sequence packing plan: which samples share one packed row, formed from the cached lengths alone.

The rule (deterministic from the seed and the epoch):

1. the epoch's sample order is the seeded permutation the unpacked sampler uses;
2. the samples it keeps are cut into windows of ``window``; within a window, samples are
   sorted longest first (ties: more ViT patches first, then the earlier position) and
   placed first-fit into packs of at most ``max_tokens`` LLM tokens (first-fit
   decreasing); a sample is never split, and one longer than ``max_tokens`` is dropped
   and counted as ``longer_than_pack``;
3. a window's packs are then trained in a seeded random order (by seed, epoch and window),
   not in the longest-first order they were opened in: otherwise every epoch would start with
   its longest samples and end with its shortest, and the tail packs that fill no global batch
   (left for the next epoch) would hold the same short samples every epoch, never trained.
   A window's samples are still trained together (the shuffle stays local to ``window`` samples).

:func:`deal` then spreads the packs of one global batch over the data-parallel ranks x
micro-batches so that each gets similar work on both the LLM (tokens) and the ViT
(patches).  Nothing here reads pixels or tokens: the plan costs O(n log window).
:class:`PackedBatchSampler` turns the plan into the data loader's micro-batches: global
batch k is packs ``[k*G, (k+1)*G)`` of the epoch (G = data-parallel size x micro-batches x
packs per micro-batch), dealt by :func:`deal`; the tail packs that fill no global batch are
left for the next epoch's plan to reshuffle.  Its position is ``consumed_samples`` (samples,
not packs), so a resumed run continues from the same global batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

import numpy as np

from mindspeed_mm.data.sampler import shuffled_order

DROP_REASON = "longer_than_pack"


@dataclass(frozen=True)
class PackPlan:
    """Packs (arrays of sample indices, in the order they are trained) for one epoch."""
    packs: List[np.ndarray]
    max_tokens: int
    tokens: List[int] = field(default_factory=list)   # real LLM tokens per pack
    patches: List[int] = field(default_factory=list)  # ViT patches per pack
    dropped: int = 0                                   # samples longer than max_tokens

    @property
    def efficiency(self) -> float:
        """Real tokens / capacity of the packs (1 - padding share)."""
        return sum(self.tokens) / (len(self.packs) * self.max_tokens) if self.packs else 0.0

    @property
    def samples(self) -> int:
        return sum(len(p) for p in self.packs)


def plan_packs(lengths: Sequence[int], patches: Sequence[int], max_tokens: int, seed: int = 1234,
               epoch: int = 0, window: int = 1000, shuffle: bool = True) -> PackPlan:
    """First-fit-decreasing packs within shuffle windows (the module docstring's rule)."""
    if max_tokens < 1 or window < 1:
        raise ValueError(f"max_tokens ({max_tokens}) and window ({window}) must be >= 1")
    lengths, patches = np.asarray(lengths, np.int64), np.asarray(patches, np.int64)
    if lengths.shape != patches.shape:
        raise ValueError(f"{len(lengths)} lengths but {len(patches)} patch counts")
    order = shuffled_order(len(lengths), seed, epoch, shuffle)
    too_long = lengths[order] > max_tokens
    kept = order[~too_long]
    packs, tokens, vit = [], [], []
    for start in range(0, len(kept), window):
        chunk = kept[start:start + window]
        # longest first; ties: more patches, then the earlier position in the epoch order
        ranked = chunk[np.lexsort((np.arange(len(chunk)), -patches[chunk], -lengths[chunk]))]
        members: List[List[int]] = []
        room = np.empty(len(chunk), np.int64)  # free tokens of each open pack (at most one per sample)
        for i, n in zip(ranked.tolist(), lengths[ranked].tolist()):
            fits = np.flatnonzero(room[:len(members)] >= n)
            b = int(fits[0]) if len(fits) else len(members)
            if b == len(members):
                members.append([])
                room[b] = max_tokens
            members[b].append(i)
            room[b] -= n
        if shuffle:
            members = [members[i] for i in np.random.default_rng([seed, epoch, start]).permutation(len(members))]
        for m in members:
            packs.append(np.asarray(m, np.int64))
            tokens.append(int(lengths[m].sum()))
            vit.append(int(patches[m].sum()))
    return PackPlan(packs, max_tokens, tokens, vit, dropped=int(too_long.sum()))


def deal(tokens: Sequence[int], patches: Sequence[int], groups: int, per_group: int = None) -> List[List[int]]:
    """Pack positions dealt to ``groups`` (DP ranks x micro-batches), balancing tokens and patches.

    Longest-processing-time first: packs by decreasing cost go to the group whose load is
    lowest (among those with fewer than ``per_group`` packs, when given), where cost and load
    add the pack's shares of the total tokens and of the total patches (so a ViT-heavy pack
    counts as heavy even when short).  Each group's positions keep their original order.
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    tokens, patches = np.asarray(tokens, np.float64), np.asarray(patches, np.float64)
    if per_group is not None and len(tokens) > groups * per_group:
        raise ValueError(f"{len(tokens)} packs do not fit {groups} groups of {per_group}")
    cost = tokens / max(tokens.sum(), 1.0) + patches / max(patches.sum(), 1.0)
    load = np.zeros(groups)
    out: List[List[int]] = [[] for _ in range(groups)]
    for i in np.lexsort((np.arange(len(cost)), -cost)).tolist():
        g = int(np.argmin(load))
        out[g].append(i)
        load[g] += cost[i]
        if per_group is not None and len(out[g]) == per_group:
            load[g] = np.inf  # full
    return [sorted(g) for g in out]


@dataclass(frozen=True)
class GlobalBatch:
    """One iteration's packs: ``groups[r * micro_batches + m]`` holds the sample indices of
    data-parallel rank r's micro-batch m (its packs, concatenated)."""
    groups: List[np.ndarray]
    samples: int


class PackedBatchSampler:
    """The data loader's batch sampler under packing: endless micro-batches (lists of sample
    indices, one packed row each) for one data-parallel rank, resumable from ``consumed_samples``.

    ``lengths`` / ``patches``: LLM tokens and ViT patches of every sample of the dataset.
    """

    def __init__(self, lengths, patches, max_tokens: int, packs_per_micro_batch: int = 1, micro_batches: int = 1,
                 dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0, shuffle: bool = True,
                 seed: int = 1234, window: int = 1000):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside data-parallel size {dp_size}")
        self.lengths, self.patches = np.asarray(lengths, np.int64), np.asarray(patches, np.int64)
        self.max_tokens, self.window, self.shuffle, self.seed = max_tokens, window, shuffle, seed
        self.per_group, self.micro_batches = packs_per_micro_batch, micro_batches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.groups = micro_batches * dp_size
        self.packs_per_step = self.groups * packs_per_micro_batch
        self.consumed_samples = consumed_samples
        self._epochs = {}
        first = self.plan(0)
        if len(self.global_batches(0)) == 0:
            raise ValueError(f"{len(self.lengths)} usable samples make {len(first.packs)} pack(s) of at most "
                             f"{max_tokens} tokens, fewer than one global batch of {self.packs_per_step} packs "
                             f"({packs_per_micro_batch} per micro-batch x {micro_batches} micro-batch(es) x "
                             f"data-parallel size {dp_size})")

    def plan(self, epoch: int) -> PackPlan:
        return plan_packs(self.lengths, self.patches, self.max_tokens, self.seed, epoch, self.window, self.shuffle)

    def global_batches(self, epoch: int) -> List[GlobalBatch]:
        """Epoch ``epoch``'s global batches (cached: every epoch is planned once)."""
        if epoch not in self._epochs:
            plan, out = self.plan(epoch), []
            for start in range(0, len(plan.packs) - self.packs_per_step + 1, self.packs_per_step):
                span = range(start, start + self.packs_per_step)
                dealt = deal([plan.tokens[i] for i in span], [plan.patches[i] for i in span], self.groups,
                             self.per_group)
                groups = [np.concatenate([plan.packs[start + i] for i in g]) for g in dealt]
                out.append(GlobalBatch(groups, sum(len(g) for g in groups)))
            self._epochs = {epoch: out}  # keep one epoch: a long run never holds more
        return self._epochs[epoch]

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank (of the first epoch: later ones differ by a few)."""
        return len(self.global_batches(0)) * self.micro_batches

    def __iter__(self):
        """Endless; starts at the global batch holding sample ``consumed_samples`` (a partly consumed one restarts)."""
        epoch, before, consumed = 0, 0, self.consumed_samples  # before: samples of the epochs before `epoch`
        while True:
            batches = self.global_batches(epoch)
            if not batches:  # possible only when epoch 0 barely filled one global batch
                raise RuntimeError(f"packing: epoch {epoch} makes no full global batch of {self.packs_per_step} packs")
            in_epoch = sum(b.samples for b in batches)
            if before + in_epoch <= consumed:
                before += in_epoch
                epoch += 1
                continue
            done = before
            for batch in batches:
                if done + batch.samples > consumed:
                    first = self.dp_rank * self.micro_batches
                    for m in range(self.micro_batches):
                        yield batch.groups[first + m].tolist()
                done += batch.samples
            consumed = before = done
            epoch += 1
