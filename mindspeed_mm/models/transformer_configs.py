"""megatron-core TransformerConfig of the Qwen2 LLM, and the settings every config here shares.

A family's ViT builds its own config from :func:`common_settings` (models/qwen2vl/vision_encoder.py).

Fusions that need TransformerEngine / apex / CUDA JIT are off: the platform's
attention and norm modules (in the layer spec) pick the device kernels.
"""
import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from mindspeed_mm.constants import torch_dtype
from mindspeed_mm.errors import UserError
from mindspeed_mm.models.parallel import ParallelSettings, megatron_layout



def common_settings(cfg, parallel: ParallelSettings) -> dict:
    """dtype, TP size, recompute and the fusions left off, for any TransformerConfig of the model."""
    from mindspeed_mm.platform import current_platform

    dtype = torch_dtype(cfg.dtype)
    recompute = dict(recompute_granularity=parallel.recompute_granularity)
    if parallel.recompute_granularity == "full":
        recompute.update(recompute_method=parallel.recompute_method,
                         recompute_num_layers=parallel.recompute_num_layers)
    elif parallel.recompute_granularity == "selective":
        recompute.update(recompute_modules=list(parallel.recompute_modules))
    return dict(
        tensor_model_parallel_size=parallel.tensor_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True,
        use_cpu_initialization=current_platform().is_cpu,
        bias_dropout_fusion=False, bias_activation_fusion=False, gradient_accumulation_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        **recompute,
    )


def language_transformer_config(cfg, parallel: ParallelSettings) -> TransformerConfig:
    """Qwen2 decoder: RMSNorm, SwiGLU, GQA with qkv bias, M-RoPE; stage layout from parallel.stage_layers."""
    t = cfg.text
    stage_layers = parallel.resolved_stage_layers(t.num_layers)
    pipeline = {}
    if len(stage_layers) > 1:
        pipeline = dict(pipeline_model_parallel_size=len(stage_layers),
                        pipeline_model_parallel_layout=megatron_layout(stage_layers))
    try:
        return TransformerConfig(
            num_layers=t.num_layers, hidden_size=t.hidden_size, ffn_hidden_size=t.ffn_hidden_size,
            num_attention_heads=t.num_attention_heads, num_query_groups=t.num_query_groups,
            kv_channels=t.kv_channels, normalization="RMSNorm", layernorm_epsilon=t.normalization_epsilon,
            gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
            mrope_section=list(t.mrope_section), rotary_interleaved=False,
            sequence_parallel=parallel.sequence_parallel,
            **pipeline, **common_settings(cfg, parallel))
    except (AssertionError, ValueError) as exc:
        raise UserError(f"language model parallel settings: {exc}") from None
