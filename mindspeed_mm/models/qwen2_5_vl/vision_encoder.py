"""Qwen2.5-VL vision encoder: Qwen2-VL's ViT with RMSNorm, a gated SiLU MLP and window attention.

Window attention.  Every frame's merged tokens (merge x merge patches, consecutive in the processor's
order) are cut into windows of ``window_size / patch_size / merge`` merged tokens per side, row-major,
the last row / column of windows partial when the grid does not divide (HF's ``get_window_index``).
The encoder permutes the patch sequence once, in merge-unit groups, so that every window is contiguous
(frames stay contiguous and in order: the permutation never crosses a frame), runs the blocks on that
order, and puts the output back in the processor's order (the inverse permutation, again in merge-unit
groups, so the projector's view of merge**2 consecutive patches holds):

    windowed blocks    attend within each window  (cu_seqlens over the windows)
    full blocks        attend within each frame   (``fullatt_block_indexes``; per-frame cu_seqlens, as Qwen2-VL)

Both sets of boundaries travel in one :class:`VisionSeqParams` (the full one, carrying the windowed one);
each layer (:class:`WindowAttentionLayer`) picks its own, so megatron's TransformerBlock, its full
recompute included, runs unchanged.  Since the permutation only reorders merge units and the projector
works per merge unit, undoing it before the projector equals HF's undoing it after the merger.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.layer_spec import transformer_layer_spec
from mindspeed_mm.models.parallel import ParallelSettings
from mindspeed_mm.models.qwen2_5_vl.config import Qwen2_5_VisionConfig
from mindspeed_mm.models.qwen2vl.vision_encoder import VisionRotary, frame_cu_seqlens, patch_positions
from mindspeed_mm.models.transformer_configs import common_settings


def vision_transformer_config(cfg, parallel: ParallelSettings) -> TransformerConfig:
    """Qwen2.5-VL ViT: RMSNorm, gated SiLU MLP (gate/up/down with biases), qkv bias, all heads their own group.

    As Qwen2-VL's, the ViT lives whole on the first pipeline stage and runs without sequence parallelism.
    """
    v = cfg.vision
    try:
        return TransformerConfig(
            num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
            num_attention_heads=v.num_attention_heads, num_query_groups=v.num_attention_heads,
            kv_channels=v.hidden_size // v.num_attention_heads, normalization="RMSNorm",
            layernorm_epsilon=v.layernorm_epsilon, gated_linear_unit=True, activation_func=F.silu,
            add_bias_linear=True, add_qkv_bias=True,
            sequence_parallel=False, pipeline_model_parallel_size=1, **common_settings(cfg, parallel))
    except (AssertionError, ValueError) as exc:
        raise UserError(f"vision encoder parallel settings: {exc}") from None


def window_index(grid_thw: torch.Tensor, merge: int, window: int) -> Tuple[torch.Tensor, List[int]]:
    """(order [n_patches / merge**2] of the merge units in window order, window boundaries in patches).

    HF's ``get_window_index``: per frame, merge units row-major within each ``window`` x ``window`` tile,
    tiles row-major, the last ones partial; boundaries [0, ..., n_patches] without empty windows.
    """
    order, bounds, base = [], [0], 0
    unit = merge * merge
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // window), -(-gw // window)
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        padded = F.pad(index, (0, nw * window - gw, 0, nh * window - gh), value=-1)
        tiles = padded.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
        keep = tiles >= 0
        order.append(tiles[keep] + base)
        for count in keep.sum(-1).tolist():
            if count:
                bounds.append(bounds[-1] + count * unit)
        base += t * gh * gw
    return torch.cat(order), bounds


class _PermuteRows(torch.autograd.Function):
    """x[order] whose backward is grad[inverse] (a gather), not an index scatter-add (slow on the CPU)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def permute_units(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows of ``x`` [n, ...] reordered in groups of ``unit`` consecutive rows: group i <- group order[i]."""
    grouped = x.reshape(x.shape[0] // unit, -1)
    return _PermuteRows.apply(grouped, order, inverse).reshape(x.shape)


@dataclass
class VisionSeqParams(PackedSeqParams):
    """Per-frame boundaries (the full-attention blocks') carrying the windowed blocks' in ``window``."""
    window: Optional[PackedSeqParams] = None


class WindowAttentionLayer(TransformerLayer):
    """A ViT layer that attends within windows unless ``full_attention`` (set by the encoder)."""

    full_attention: bool = True

    def forward(self, *args, **kwargs):
        params = kwargs.get("packed_seq_params")
        if not self.full_attention and isinstance(params, VisionSeqParams) and params.window is not None:
            kwargs["packed_seq_params"] = params.window
        return super().forward(*args, **kwargs)


def _packed(cu: torch.Tensor, params_cls=PackedSeqParams, **extra) -> PackedSeqParams:
    longest = int((cu[1:] - cu[:-1]).max())
    return params_cls(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                      max_seqlen_kv=longest, **extra)


class VisionEncoder(MegatronModule):
    """pixel_values [n_patches, C*T*P*P] + grid_thw [n, 3] -> patch features [n_patches, hidden] (processor order)."""

    def __init__(self, vision: Qwen2_5_VisionConfig, config):
        super().__init__(config=config)
        self.merge = vision.spatial_merge_size
        self.window = vision.window_merge_units
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        # HF's Conv3d with stride == kernel is this linear map of the flattened patch.
        self.patch_embed = torch.nn.Linear(patch_dim, vision.hidden_size, bias=False, dtype=config.params_dtype)
        self.rotary = VisionRotary(vision.hidden_size // vision.num_attention_heads)
        spec = transformer_layer_spec(AttnMaskType.no_mask)  # a fresh spec: changing it touches no other model
        spec.module = WindowAttentionLayer
        self.blocks = TransformerBlock(config, spec, post_layer_norm=False, pre_process=True, post_process=False)
        full = set(vision.fullatt_block_indexes)
        for i, layer in enumerate(self.blocks.layers):
            layer.full_attention = i in full

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid = grid_thw.detach().cpu().long()
        unit = self.merge ** 2
        order, bounds = window_index(grid, self.merge, self.window)  # on the CPU: no device sync
        positions = patch_positions(grid, self.merge)  # [n, 2] (row, column), processor order
        positions = positions.view(-1, unit, 2)[order].reshape(-1, 2)
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype))
        device = x.device
        rotary = self.rotary(positions).to(device)
        order, inverse = order.to(device), torch.argsort(order).to(device)
        x = permute_units(x, order, inverse, unit)
        packed = _packed(frame_cu_seqlens(grid).to(device), VisionSeqParams,
                         window=_packed(torch.tensor(bounds, dtype=torch.int32, device=device)))
        x = self.blocks(x[:, None], attention_mask=None, rotary_pos_emb=rotary, packed_seq_params=packed)[:, 0]
        return permute_units(x, inverse, order, unit)  # back to the processor's order
