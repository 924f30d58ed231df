"""Qwen2-VL vision encoder: patch embedding, 2-D rotary, megatron-core TransformerBlock.

All patches of a batch run as one sequence [n_patches, 1, hidden] ('sbhd',
batch 1).  ``packed_seq_params`` carries cu_seqlens from ``image_grid_thw``
(one segment per image frame, as HF), which the platform's CoreAttention turns
into block-diagonal attention, so patches of different images never attend to
each other.  The rotary angles are given per patch ([n, 1, 1, head_dim]); they
must not go through megatron's 'thd' rope path, which restarts positions at
every segment.
"""
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlock

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.layer_spec import transformer_layer_spec
from mindspeed_mm.models.parallel import ParallelSettings
from mindspeed_mm.models.qwen2vl.config import VisionConfig
from mindspeed_mm.models.transformer_configs import common_settings

ROPE_THETA = 10000.0


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """HF's QuickGELUActivation, eager.  megatron-core's quick_gelu is wrapped in torch.compile, whose
    guards cost ~7 ms a call on the CPU with a new patch count every batch (the tiny ViT's whole MLP
    is less), and whose fused kernel rounds differently from HF's."""
    return x * torch.sigmoid(1.702 * x)


VISION_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}


def vision_transformer_config(cfg, parallel: ParallelSettings) -> TransformerConfig:
    """Qwen2-VL ViT: LayerNorm, quick_gelu MLP, biases everywhere, all heads its own group.

    The ViT lives whole on the first pipeline stage (pipeline size 1 here) and
    runs without sequence parallelism (its sequence is the patches of a batch).
    """
    v = cfg.vision
    if v.activation_func not in VISION_ACTIVATIONS:
        raise UserError(f"model config: vision.activation_func {v.activation_func!r} not supported "
                        f"(one of {', '.join(VISION_ACTIVATIONS)})")
    try:
        return TransformerConfig(
            num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
            num_attention_heads=v.num_attention_heads, num_query_groups=v.num_attention_heads,
            kv_channels=v.hidden_size // v.num_attention_heads, normalization="LayerNorm",
            layernorm_epsilon=v.layernorm_epsilon, gated_linear_unit=False,
            activation_func=VISION_ACTIVATIONS[v.activation_func], add_bias_linear=True, add_qkv_bias=True,
            sequence_parallel=False, pipeline_model_parallel_size=1, **common_settings(cfg, parallel))
    except (AssertionError, ValueError) as exc:
        raise UserError(f"vision encoder parallel settings: {exc}") from None


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[n_patches, 2] (row, column) of every patch, in the HF image processor's order.

    The processor emits each frame's patches merge-window by merge-window
    (2x2 neighbours consecutive), windows row-major, frames one after another.
    """
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # [h/m, m, w/m, m] -> window-major [h/m, w/m, m, m]
        frame = torch.stack([rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)], dim=-1)
        out.append(frame.repeat(t, 1))
    return torch.cat(out)


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """int32 [n_frames + 1] cumulative patch counts; every frame of every image is one segment."""
    per_frame = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
    return torch.nn.functional.pad(per_frame.cumsum(0, dtype=torch.int32), (1, 0))


class VisionRotary(torch.nn.Module):
    """2-D rotary angles: half of each head's rotary pairs turn with the row, half with the column."""

    def __init__(self, head_dim: int):
        super().__init__()
        quarter = head_dim // 2  # frequencies are shared by the row and the column halves
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # positions [n, 2] -> angles [n, 2, hd/4] -> [n, hd/2] (rows | cols) -> [n, 1, 1, hd] for rotate_half
        angles = positions.to(self.inv_freq.device, torch.float32)[..., None] * self.inv_freq
        angles = angles.flatten(1)
        return torch.cat([angles, angles], dim=-1)[:, None, None, :]


class VisionEncoder(MegatronModule):
    """pixel_values [n_patches, C*T*P*P] + image_grid_thw [n_img, 3] -> patch features [n_patches, hidden]."""

    def __init__(self, vision: VisionConfig, config):
        super().__init__(config=config)
        self.merge = vision.spatial_merge_size
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        # HF's Conv3d with stride == kernel is this linear map of the flattened patch.
        self.patch_embed = torch.nn.Linear(patch_dim, vision.hidden_size, bias=False, dtype=config.params_dtype)
        self.rotary = VisionRotary(vision.hidden_size // vision.num_attention_heads)
        self.blocks = TransformerBlock(config, transformer_layer_spec(AttnMaskType.no_mask),
                                       post_layer_norm=False, pre_process=True, post_process=False)

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        grid = image_grid_thw.detach().cpu().long()
        rotary = self.rotary(patch_positions(grid, self.merge)).to(x.device)
        cu = frame_cu_seqlens(grid).to(x.device)
        longest = int((cu[1:] - cu[:-1]).max())
        packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=longest, max_seqlen_kv=longest)
        x = self.blocks(x[:, None], attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=packed)
        return x[:, 0]  # [n_patches, hidden]
