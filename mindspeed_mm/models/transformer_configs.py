"""megatron-core TransformerConfigs for the ViT and the LLM, from Qwen2VLConfig + ParallelSettings.

Fusions that need TransformerEngine / apex / CUDA JIT are off: the platform's
attention and norm modules (in the layer spec) pick the device kernels.
"""
import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.transformer import TransformerConfig

from mindspeed_mm.constants import torch_dtype
from mindspeed_mm.errors import UserError
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from mindspeed_mm.models.parallel import ParallelSettings, megatron_layout

VISION_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "silu": F.silu}


def _common(cfg: Qwen2VLConfig, parallel: ParallelSettings) -> dict:
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


def language_transformer_config(cfg: Qwen2VLConfig, parallel: ParallelSettings) -> TransformerConfig:
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
            **pipeline, **_common(cfg, parallel))
    except (AssertionError, ValueError) as exc:
        raise UserError(f"language model parallel settings: {exc}") from None


def vision_transformer_config(cfg: Qwen2VLConfig, parallel: ParallelSettings) -> TransformerConfig:
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
            sequence_parallel=False, pipeline_model_parallel_size=1, **_common(cfg, parallel))
    except (AssertionError, ValueError) as exc:
        raise UserError(f"vision encoder parallel settings: {exc}") from None
