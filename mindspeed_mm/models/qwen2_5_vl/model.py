"""Qwen2.5-VL on megatron-core, one pipeline stage of it: Qwen2-VL's stage (models/qwen2vl/model.py) with
Qwen2.5-VL's ViT (window attention, RMSNorm, gated SiLU MLP), its RMSNorm patch merger, its mapping table
and M-RoPE with absolute video time.

Everything else is shared: the Qwen2 LLM (models/language_model.py), image / video feature injection, one
ViT call for the images and videos of a batch, the pipeline rule (ViT + merger + embedding on the first
stage), freezing, tensor parallelism (the ViT's linears are megatron's column / row parallel layers) and
the forward signature, which takes ``second_per_grid_ts`` [n_videos] (seconds per temporal patch, the HF
processor's) for the positions it computes when position_ids is None.
"""
from typing import Optional

import torch

from mindspeed_mm.models.parallel import ParallelSettings
from mindspeed_mm.models.qwen2_5_vl.mapping import MAPPING
from mindspeed_mm.models.qwen2_5_vl.projector import VisionProjector
from mindspeed_mm.models.qwen2_5_vl.vision_encoder import VisionEncoder, vision_transformer_config
from mindspeed_mm.models.qwen2vl.model import Qwen2VLModel
from mindspeed_mm.models.rope_index import get_rope_index


class Qwen2_5_VLModel(Qwen2VLModel):
    """One pipeline stage of Qwen2.5-VL (the whole model when pre_process and post_process)."""

    mapping = MAPPING

    def build_vision(self, cfg, parallel: ParallelSettings):
        vision_config = vision_transformer_config(cfg, parallel)
        return VisionEncoder(cfg.vision, vision_config), VisionProjector(cfg.vision, vision_config)

    def rope_positions(self, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor],
                       attention_mask: Optional[torch.Tensor], video_grid_thw: Optional[torch.Tensor],
                       second_per_grid_ts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Videos at absolute time: temporal patch i at int(i * tokens_per_second * second_per_grid_ts[video])
        (1 s per temporal patch when second_per_grid_ts is None, as HF)."""
        c = self.cfg
        position_ids, _ = get_rope_index(
            input_ids, image_grid_thw, attention_mask, spatial_merge_size=c.vision.spatial_merge_size,
            image_token_id=c.image_token_id, video_token_id=c.video_token_id,
            vision_start_token_id=c.vision_start_token_id, video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts, tokens_per_second=c.vision.tokens_per_second)
        return position_ids
