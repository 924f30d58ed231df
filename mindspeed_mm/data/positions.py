"""Per-sample 3-D M-RoPE position ids, by the model's own rule (mindspeed_mm.models.rope_index)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class VisionTokenIds:
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    spatial_merge_size: int

    @classmethod
    def from_processors(cls, tokenizer, image_processor) -> "VisionTokenIds":
        ids = tokenizer.convert_tokens_to_ids
        return cls(ids("<|image_pad|>"), ids("<|video_pad|>"), ids("<|vision_start|>"),
                   image_processor.merge_size)


def _grid(grid_thw) -> torch.Tensor | None:
    return torch.from_numpy(np.asarray(grid_thw, dtype=np.int64)) if grid_thw is not None and len(grid_thw) else None


def sample_position_ids(input_ids: np.ndarray, image_grid_thw: np.ndarray, ids: VisionTokenIds,
                        video_grid_thw: np.ndarray | None = None) -> torch.Tensor:
    """LongTensor [3, s] for one unpadded sample."""
    # Imported here: the model package is heavier than the data path needs at import time.
    from mindspeed_mm.models.rope_index import get_rope_index

    pos, _ = get_rope_index(
        torch.from_numpy(np.asarray(input_ids, dtype=np.int64))[None], _grid(image_grid_thw), None,
        video_grid_thw=_grid(video_grid_thw),
        spatial_merge_size=ids.spatial_merge_size, image_token_id=ids.image_token_id,
        video_token_id=ids.video_token_id, vision_start_token_id=ids.vision_start_token_id)
    return pos[:, 0]
