"""The packing plan: deterministic, every kept sample once, packs within capacity, too-long samples
dropped and counted, >= 95% efficiency on a LLaVA-like length mix, and balanced dealing."""
import numpy as np
import pytest

from mindspeed_mm.data.packing import PackedBatchSampler, deal, plan_packs
from mindspeed_mm.data.sampler import ResumableBatchSampler


def _llava_like(n=3000, seed=0):
    """Lengths with a long tail around a mean near 600 tokens; patches ~ 4x the image tokens of 224-672 px."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(6.2, 0.55, n), 60, 6000).astype(int)
    lengths[::750] = 5000  # a few longer than any pack here
    side = rng.integers(224, 673, n) // 28
    patches = np.where(rng.random(n) < 0.9, 4 * side * side, 0)  # 10% text-only
    return lengths, patches


def test_plan_is_deterministic_complete_and_within_capacity():
    lengths, patches = _llava_like()
    a = plan_packs(lengths, patches, max_tokens=4096, seed=7, epoch=1)
    b = plan_packs(lengths, patches, max_tokens=4096, seed=7, epoch=1)
    assert [p.tolist() for p in a.packs] == [p.tolist() for p in b.packs]
    assert [p.tolist() for p in plan_packs(lengths, patches, 4096, seed=7, epoch=2).packs] != \
        [p.tolist() for p in a.packs]
    kept = np.concatenate(a.packs)
    assert len(kept) == len(set(kept.tolist())) == a.samples == int((lengths <= 4096).sum())
    assert a.dropped == int((lengths > 4096).sum()) > 0
    assert all(lengths[p].sum() <= 4096 for p in a.packs)
    assert a.tokens == [int(lengths[p].sum()) for p in a.packs]
    assert a.patches == [int(patches[p].sum()) for p in a.packs]


def test_llava_like_mix_packs_at_95_percent_or_better():
    lengths, patches = _llava_like()
    assert 500 < lengths.mean() < 700
    plan = plan_packs(lengths, patches, max_tokens=4096, seed=1)
    assert plan.efficiency >= 0.95, plan.efficiency


def test_window_keeps_the_shuffle_local():
    lengths, patches = _llava_like(400)
    order = ResumableBatchSampler(400, 1, shuffle=True, seed=3).epoch_order(0)
    plan = plan_packs(lengths, patches, max_tokens=4096, seed=3, window=100)
    kept = [int(s) for s in order if lengths[s] <= 4096]  # windows are cut from the kept samples
    position = {s: i for i, s in enumerate(kept)}
    windows = [{position[int(s)] // 100 for s in p} for p in plan.packs]
    assert all(len(w) == 1 for w in windows)  # no pack mixes two windows
    assert [min(w) for w in windows] == sorted(min(w) for w in windows)  # windows in epoch order


def test_packs_are_trained_in_shuffled_order_and_every_sample_is_reached():
    """Packs are opened longest first; trained in that order, each epoch would end with the same short
    samples in the tail packs that fill no global batch, so those would never be trained (the quickstart
    lost 6 of its 24 answers that way: 8 packs, global batches of 3)."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(60, 80, 24)
    patches = np.full(24, 64)
    plan = plan_packs(lengths, patches, max_tokens=256, seed=1234)
    firsts = [int(lengths[p].max()) for p in plan.packs]
    assert firsts != sorted(firsts, reverse=True)
    sampler = PackedBatchSampler(lengths, patches, 256, packs_per_micro_batch=1, micro_batches=3, seed=1234)
    assert len(sampler.plan(0).packs) % 3  # a tail is left each epoch
    seen, batches = set(), iter(sampler)
    for _ in range(3 * len(sampler)):  # three epochs of micro-batches
        seen.update(next(batches))
    assert seen == set(range(24))
    assert [p.tolist() for p in plan_packs(lengths, patches, 256, shuffle=False).packs] == \
        [p.tolist() for p in plan_packs(lengths, patches, 256, shuffle=False).packs]


def test_deal_balances_tokens_and_patches():
    lengths, patches = _llava_like(2000, seed=5)
    plan = plan_packs(lengths, patches, max_tokens=4096, seed=5)
    groups = deal(plan.tokens, plan.patches, 8)
    assert sorted(i for g in groups for i in g) == list(range(len(plan.packs)))
    tok = [sum(plan.tokens[i] for i in g) for g in groups]
    vit = [sum(plan.patches[i] for i in g) for g in groups]
    assert max(tok) / min(tok) < 1.05 and max(vit) / min(vit) < 1.05


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_tokens"):
        plan_packs([10], [0], max_tokens=0)
    with pytest.raises(ValueError, match="patch counts"):
        plan_packs([10, 20], [0], max_tokens=64)
    with pytest.raises(ValueError, match="groups"):
        deal([1], [1], 0)
