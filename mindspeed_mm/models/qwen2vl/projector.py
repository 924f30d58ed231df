"""Qwen2-VL patch merger: LayerNorm -> concatenate each 2x2 patch window -> Linear -> GELU -> Linear.

Tensor parallel like a megatron MLP: fc1 column-parallel, fc2 row-parallel
(its output all-reduced), so every TP rank ends with the full features.
"""
import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from mindspeed_mm.models.linear import ColumnLinear, RowLinear
from mindspeed_mm.models.qwen2vl.config import VisionConfig


class VisionProjector(MegatronModule):
    """ViT patch features [n_patches, vis_hidden] -> LLM token features [n_patches / merge**2, llm_hidden]."""

    def __init__(self, vision: VisionConfig, config):
        super().__init__(config=config)
        merged = vision.hidden_size * vision.spatial_merge_size ** 2
        self.merged = merged
        self.layernorm = torch.nn.LayerNorm(vision.hidden_size, eps=1e-6, dtype=config.params_dtype)
        self.linear_fc1 = ColumnLinear(merged, merged, config=config, init_method=config.init_method,
                                       bias=True, gather_output=False)
        self.linear_fc2 = RowLinear(merged, vision.out_hidden_size, config=config,
                                    init_method=config.output_layer_init_method, bias=True,
                                    input_is_parallel=True, skip_bias_add=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # The processor emits the merge**2 patches of a window consecutively: a view groups them.
        x = self.layernorm(patches).view(-1, self.merged)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x
