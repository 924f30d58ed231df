"""Sequence packing plan: which samples share one packed row, formed from the cached lengths alone.

The rule (deterministic from the seed and the epoch):

1. the epoch's sample order is the seeded permutation the unpacked sampler uses;
2. the samples it keeps are cut into windows of ``window``; within a window, samples are
   sorted longest first (ties: more ViT patches first, then the earlier position) and
   placed first-fit into packs of at most ``max_tokens`` LLM tokens (first-fit
   decreasing); a sample is never split, and one longer than ``max_tokens`` is dropped
   and counted as ``longer_than_pack``;
3. packs keep the window order they were opened in, so a window's samples are trained
   on together (the shuffle stays local to ``window`` samples).

:func:`deal` then spreads the packs of one global batch over the data-parallel ranks x
micro-batches so that each gets similar work on both the LLM (tokens) and the ViT
(patches).  Nothing here reads pixels or tokens: the plan costs O(n log window).
Not wired into training yet (issue 13): the batcher, THD attention and M-RoPE restarts
build on it.
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
        room: List[int] = []
        for i in ranked.tolist():
            n = int(lengths[i])
            for b, free in enumerate(room):
                if n <= free:
                    members[b].append(i)
                    room[b] -= n
                    break
            else:
                members.append([i])
                room.append(max_tokens - n)
        for m in members:
            packs.append(np.asarray(m, np.int64))
            tokens.append(int(lengths[m].sum()))
            vit.append(int(patches[m].sum()))
    return PackPlan(packs, max_tokens, tokens, vit, dropped=int(too_long.sum()))


def deal(tokens: Sequence[int], patches: Sequence[int], groups: int) -> List[List[int]]:
    """Pack positions dealt to ``groups`` (DP ranks x micro-batches), balancing tokens and patches.

    Longest-processing-time first: packs by decreasing cost go to the group whose load is
    lowest, where cost and load add the pack's shares of the total tokens and of the total
    patches (so a ViT-heavy pack counts as heavy even when short).  Each group's positions
    keep their original order.
    """
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    tokens, patches = np.asarray(tokens, np.float64), np.asarray(patches, np.float64)
    cost = tokens / max(tokens.sum(), 1.0) + patches / max(patches.sum(), 1.0)
    load = np.zeros(groups)
    out: List[List[int]] = [[] for _ in range(groups)]
    for i in np.lexsort((np.arange(len(cost)), -cost)).tolist():
        g = int(np.argmin(load))
        out[g].append(i)
        load[g] += cost[i]
    return [sorted(g) for g in out]
