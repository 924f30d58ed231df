import itertools

import pytest
import torch

from mindspeed_mm.data.collate import Qwen2VLCollator
from mindspeed_mm.data.sampler import ResumableBatchSampler


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_deterministic_from_seed_and_reshuffled_per_epoch():
    a = _take(ResumableBatchSampler(10, 2, seed=7), 10)
    assert a == _take(ResumableBatchSampler(10, 2, seed=7), 10)
    assert a != _take(ResumableBatchSampler(10, 2, seed=8), 10)
    epoch0, epoch1 = sum(a[:5], []), sum(a[5:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1


def test_dp_ranks_are_disjoint_and_cover_the_epoch():
    per_rank = [_take(ResumableBatchSampler(12, 2, dp_rank=r, dp_size=3, seed=1), 2) for r in range(3)]
    seen = sorted(i for batches in per_rank for b in batches for i in b)
    assert seen == list(range(12))


@pytest.mark.parametrize("consumed", [0, 6, 12, 18, 30])
def test_resume_continues_exactly(consumed):
    dp, mbs = 3, 2
    full = [_take(ResumableBatchSampler(13, mbs, r, dp, seed=3, drop_last=True), 8) for r in range(dp)]
    step = consumed // (mbs * dp)
    for r in range(dp):
        resumed = _take(ResumableBatchSampler(13, mbs, r, dp, consumed_samples=consumed, seed=3), 8 - step)
        assert resumed == full[r][step:]


def test_drop_last_false_tops_up_the_tail():
    s = ResumableBatchSampler(5, 2, shuffle=False, drop_last=False)
    assert _take(s, 3) == [[0, 1], [2, 3], [4, 0]]
    assert _take(ResumableBatchSampler(5, 2, shuffle=False, drop_last=True), 3) == [[0, 1], [2, 3], [0, 1]]


def test_too_few_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        ResumableBatchSampler(3, 2, dp_rank=0, dp_size=2)


def _sample(n, image=False):
    ids = torch.arange(1, n + 1)
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(n).expand(3, n),
            "mm_token_type_ids": torch.zeros(n, dtype=torch.long),
            "pixel_values": torch.ones(4, 1176) if image else None,
            "image_grid_thw": torch.tensor([[1, 2, 2]]) if image else None}


def test_collate_pads_right_to_longest_multiple_or_length():
    b = Qwen2VLCollator(pad_token_id=99)([_sample(3, image=True), _sample(5), _sample(2, image=True)])
    assert b["input_ids"].shape == (3, 5) and b["position_ids"].shape == (3, 3, 5)
    assert b["input_ids"][0].tolist() == [1, 2, 3, 99, 99]
    assert b["labels"][0].tolist() == [1, 2, 3, -100, -100]
    assert b["attention_mask"].sum(1).tolist() == [3, 5, 2]
    assert b["pixel_values"].shape == (8, 1176) and b["image_grid_thw"].shape == (2, 3)
    b = Qwen2VLCollator(pad_token_id=99, pad_to_multiple_of=4)([_sample(5)])
    assert b["input_ids"].shape == (1, 8) and b["pixel_values"] is None and b["image_grid_thw"] is None
    b = Qwen2VLCollator(pad_token_id=99, min_length=7)([_sample(3), _sample(2)])  # --seq-length batches
    assert b["input_ids"].shape == (2, 7) and b["labels"][0].tolist() == [1, 2, 3] + [-100] * 4
    assert b["attention_mask"].sum(1).tolist() == [3, 2]
