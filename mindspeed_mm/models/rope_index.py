"""3-D M-RoPE position ids (temporal, height, width), as Hugging Face computes them.

Text tokens advance all three components together by 1.  The tokens of one
image or video (a run of ``<|image_pad|>`` / ``<|video_pad|>`` tokens, one per
merged 2x2 patch, row-major over its ``(t, h/merge, w/merge)`` grid) share the
start position ``p`` and get ``(p + t_i, p + h_i, p + w_i)``; the text after
it continues at ``p + max(h, w) / merge``.  Qwen2.5-VL (``tokens_per_second`` given) steps a video's
temporal component by absolute time instead: temporal patch ``t_i`` sits at ``p + int(t_i * interval)``
with ``interval = tokens_per_second * second_per_grid_t`` (the clip's seconds per temporal patch), cast
as transformers' ``Qwen2_5_VLModel.get_rope_index`` casts it.  Padding (``attention_mask == 0``)
gets position 0 and is skipped, so left and right padding give the same
positions to the real tokens.  This is transformers 5's
``Qwen2VLModel.get_rope_index`` (tested against it in tests/test_rope_index.py).
"""
from typing import Optional, Tuple

import torch

from mindspeed_mm.errors import UserError


def _vision_positions(start: int, t: int, gh: int, gw: int, interval=None) -> torch.Tensor:
    """[3, t*gh*gw] positions of one image/video, row-major over (t, gh, gw).

    ``interval`` (Qwen2.5-VL videos): temporal patch i at ``int(i * interval)``, computed as HF does it
    (``(arange(t) * interval).long()``: a float32 product when interval is a float32 tensor, truncated)."""
    steps = torch.arange(t) if interval is None else (torch.arange(t) * interval).long()
    ti = steps.repeat_interleave(gh * gw)
    hi = torch.arange(gh).repeat_interleave(gw).repeat(t)
    wi = torch.arange(gw).repeat(t * gh)
    return torch.stack([ti, hi, wi]) + start


def get_rope_index(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                   attention_mask: Optional[torch.Tensor] = None, *, spatial_merge_size: int,
                   image_token_id: int, video_token_id: int, vision_start_token_id: int = None,
                   video_grid_thw: Optional[torch.Tensor] = None, second_per_grid_ts=None,
                   tokens_per_second: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Position ids [3, b, s] (long) and rope deltas [b, 1] (long: max position + 1 - real length).

    ``image_grid_thw`` [n_img, 3] / ``video_grid_thw`` [n_vid, 3] list the
    images / videos of the whole batch in token order (sample 0 first).
    Images are found as runs of ``image_token_id`` (the tokens between
    ``<|vision_start|>`` and ``<|vision_end|>``); ``vision_start_token_id`` is
    accepted for the callers' convenience and not needed.

    ``tokens_per_second`` (Qwen2.5-VL's ``vision_config.tokens_per_second``) turns on absolute video time:
    video ``k`` (batch order) steps its temporal positions by ``tokens_per_second * second_per_grid_ts[k]``
    (``second_per_grid_ts`` [n_vid]: seconds per temporal patch, a tensor or a list; None: 1 s, as HF).
    With ``tokens_per_second`` None the rule is Qwen2-VL's (one step per temporal patch) and
    ``second_per_grid_ts`` is not used.  Images always step by 1 (they have one temporal patch).
    """
    del vision_start_token_id
    seconds = None
    if tokens_per_second is not None and second_per_grid_ts is not None:
        seconds = torch.as_tensor(second_per_grid_ts).detach().cpu().reshape(-1)
        if len(seconds) != len(_grid_list(video_grid_thw)):
            raise UserError(f"second_per_grid_ts has {len(seconds)} entries but video_grid_thw has "
                            f"{len(_grid_list(video_grid_thw))} videos")
    batch, seq = input_ids.shape
    ids_cpu = input_ids.detach().cpu()
    mask = None if attention_mask is None else attention_mask.detach().cpu().bool()
    grids = {
        image_token_id: ("image", _grid_list(image_grid_thw)),
        video_token_id: ("video", _grid_list(video_grid_thw)),
    }
    used = {image_token_id: 0, video_token_id: 0}
    position_ids = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    for b in range(batch):
        tokens = (ids_cpu[b] if mask is None else ids_cpu[b][mask[b]]).tolist()
        chunks, pos, j = [], 0, 0
        while j < len(tokens):
            tok = tokens[j]
            if tok in grids:
                kind, grid_list = grids[tok]
                if used[tok] >= len(grid_list):
                    raise UserError(f"sample {b}: more {kind}s in input_ids than {kind}_grid_thw entries "
                                    f"({len(grid_list)})")
                t, h, w = grid_list[used[tok]]
                used[tok] += 1
                gh, gw = h // spatial_merge_size, w // spatial_merge_size
                count = t * gh * gw
                if tokens[j:j + count] != [tok] * count:
                    raise UserError(f"sample {b}: {kind} {used[tok] - 1} with grid (t={t}, h={h}, w={w}) needs "
                                    f"{count} consecutive {kind} tokens, input_ids hold fewer")
                interval = None
                if kind == "video" and tokens_per_second is not None:
                    # HF: tokens_per_second * next(second_per_grid_ts) (a 0-d tensor element, or 1 when none)
                    interval = tokens_per_second * (seconds[used[tok] - 1] if seconds is not None else 1)
                chunks.append(_vision_positions(pos, t, gh, gw, interval))
                pos += max(gh, gw)
                j += count
            else:
                k = j
                while k < len(tokens) and tokens[k] not in grids:
                    k += 1
                chunks.append(torch.arange(pos, pos + k - j).expand(3, -1))
                pos += k - j
                j = k
        if not chunks:
            continue
        sample = torch.cat(chunks, dim=1)
        if mask is None:
            position_ids[:, b] = sample
        else:
            position_ids[:, b, mask[b]] = sample
        deltas[b, 0] = int(sample.max()) + 1 - len(tokens)
    for tok, (kind, grid_list) in grids.items():
        if used[tok] != len(grid_list):
            raise UserError(f"{kind}_grid_thw has {len(grid_list)} entries but input_ids hold {used[tok]} {kind}s")
    return position_ids.to(input_ids.device), deltas.to(input_ids.device)


def _grid_list(grid_thw):
    return [] if grid_thw is None else [tuple(int(x) for x in row) for row in grid_thw.tolist()]
