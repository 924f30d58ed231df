"""Per-sample 3-D M-RoPE position ids, by the model's own rule (mindspeed_mm.models.rope_index).

Qwen2-VL steps a video's temporal position by 1 per temporal patch; Qwen2.5-VL by the patch's duration
in seconds x ``vision_config.tokens_per_second`` (its config.json), i.e. absolute time."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass(frozen=True)
class VisionTokenIds:
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    spatial_merge_size: int
    tokens_per_second: Optional[float] = None  # Qwen2.5-VL's absolute video time; None: Qwen2-VL's rule

    @classmethod
    def from_processors(cls, tokenizer, image_processor, model_dir: Optional[str] = None) -> "VisionTokenIds":
        ids = tokenizer.convert_tokens_to_ids
        return cls(ids("<|image_pad|>"), ids("<|video_pad|>"), ids("<|vision_start|>"),
                   image_processor.merge_size, tokens_per_second_of(model_dir))


def tokens_per_second_of(model_dir: Optional[str]) -> Optional[float]:
    """``vision_config.tokens_per_second`` of a Qwen2.5-VL HF folder; None for Qwen2-VL (or no config.json)."""
    path = os.path.join(model_dir, "config.json") if model_dir else None
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("model_type") != "qwen2_5_vl":
        return None
    return float((config.get("vision_config") or {}).get("tokens_per_second", 2))


def _grid(grid_thw) -> torch.Tensor | None:
    return torch.from_numpy(np.asarray(grid_thw, dtype=np.int64)) if grid_thw is not None and len(grid_thw) else None


def sample_position_ids(input_ids: np.ndarray, image_grid_thw: np.ndarray, ids: VisionTokenIds,
                        video_grid_thw: np.ndarray | None = None,
                        second_per_grid_ts: list | None = None) -> torch.Tensor:
    """LongTensor [3, s] for one unpadded sample (``second_per_grid_ts``: per clip, Qwen2.5-VL only)."""
    # Imported here: the model package is heavier than the data path needs at import time.
    from mindspeed_mm.models.rope_index import get_rope_index

    timing = {} if ids.tokens_per_second is None else dict(
        tokens_per_second=ids.tokens_per_second,
        second_per_grid_ts=None if not second_per_grid_ts else torch.tensor(second_per_grid_ts, dtype=torch.float32))
    pos, _ = get_rope_index(
        torch.from_numpy(np.asarray(input_ids, dtype=np.int64))[None], _grid(image_grid_thw), None,
        video_grid_thw=_grid(video_grid_thw), **timing,
        spatial_merge_size=ids.spatial_merge_size, image_token_id=ids.image_token_id,
        video_token_id=ids.video_token_id, vision_start_token_id=ids.vision_start_token_id)
    return pos[:, 0]
