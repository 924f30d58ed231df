"""M-RoPE positions equal transformers' Qwen2VLModel.get_rope_index, and bad grids fail clearly."""
import pytest
import torch

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.rope_index import get_rope_index
from scripts.make_tiny_qwen2vl import tiny_config

IMG, VID, START, END, PAD = 2060, 2061, 2057, 2058, 2048
MERGE = 2


@pytest.fixture(scope="module")
def hf_model():
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    cfg = tiny_config(image_token_id=IMG, video_token_id=VID, vision_start_token_id=START,
                      vision_end_token_id=END)
    return Qwen2VLModel(cfg).eval()


def _vision(tok, t, h, w):
    return [START] + [tok] * (t * h * w // MERGE ** 2) + [END]


def _batch(samples, pad_left):
    """Pad token lists to one length; returns input_ids, attention_mask [b, s]."""
    seq = max(len(s) for s in samples)
    ids = torch.full((len(samples), seq), PAD)
    mask = torch.zeros(len(samples), seq, dtype=torch.long)
    for i, s in enumerate(samples):
        sl = slice(seq - len(s), seq) if pad_left else slice(0, len(s))
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


def _text(n, seed):
    return torch.randint(0, 2000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _compare(hf_model, ids, mask, image_grid=None, video_grid=None):
    type_ids = (ids == IMG).int() + 2 * (ids == VID).int()
    want_pos, want_delta = hf_model.get_rope_index(ids, type_ids, image_grid_thw=image_grid,
                                                   video_grid_thw=video_grid, attention_mask=mask)
    pos, delta = get_rope_index(ids, image_grid, mask, spatial_merge_size=MERGE, image_token_id=IMG,
                                video_token_id=VID, vision_start_token_id=START, video_grid_thw=video_grid)
    assert pos.shape == (3, *ids.shape) and pos.dtype == torch.long
    torch.testing.assert_close(pos, want_pos, rtol=0, atol=0)
    torch.testing.assert_close(delta, want_delta.long().reshape(-1, 1), rtol=0, atol=0)
    return pos


@pytest.mark.parametrize("pad_left", [True, False])
def test_two_images_and_text_only_sample(hf_model, pad_left):
    grids = torch.tensor([[1, 4, 6], [1, 8, 2]])
    s0 = _text(5, 0) + _vision(IMG, 1, 4, 6) + _text(3, 1) + _vision(IMG, 1, 8, 2) + _text(4, 2)
    s1 = _text(9, 3)
    ids, mask = _batch([s0, s1], pad_left)
    pos = _compare(hf_model, ids, mask, grids)
    # the first image (merged grid 2 x 3) really is 2-D: 2 distinct rows, 3 distinct columns
    first = pos[:, 0][:, ids[0] == IMG][:, :6]
    assert [len(set(r.tolist())) for r in first] == [1, 2, 3]


def test_images_in_several_samples_and_video(hf_model):
    s0 = _text(2, 4) + _vision(IMG, 1, 2, 4) + _text(6, 5)
    s1 = _text(3, 6) + _vision(VID, 3, 4, 2) + _text(2, 7) + _vision(IMG, 1, 6, 6) + _text(1, 8)
    ids, mask = _batch([s0, s1], pad_left=True)
    _compare(hf_model, ids, mask, torch.tensor([[1, 2, 4], [1, 6, 6]]), torch.tensor([[3, 4, 2]]))


def test_text_only_batch_without_mask(hf_model):
    ids = torch.tensor([_text(7, 9), _text(7, 10)])
    _compare(hf_model, ids, None)
    pos, delta = get_rope_index(ids, None, spatial_merge_size=MERGE, image_token_id=IMG,
                                video_token_id=VID, vision_start_token_id=START)
    assert torch.equal(pos, torch.arange(7).expand(3, 2, 7)) and not delta.any()


def test_grid_and_token_count_mismatch_name_the_sample():
    ids, mask = _batch([_text(3, 0), _text(2, 1) + _vision(IMG, 1, 4, 4)], pad_left=False)
    kw = dict(spatial_merge_size=MERGE, image_token_id=IMG, video_token_id=VID, vision_start_token_id=START)
    with pytest.raises(UserError, match="sample 1: image 0 with grid"):
        get_rope_index(ids, torch.tensor([[1, 4, 6]]), mask, **kw)
    with pytest.raises(UserError, match="sample 1: more images"):
        get_rope_index(ids, None, mask, **kw)
    with pytest.raises(UserError, match="image_grid_thw has 2 entries but input_ids hold 1"):
        get_rope_index(ids, torch.tensor([[1, 4, 4], [1, 4, 4]]), mask, **kw)
