"""The project's megatron-core transformer layer spec.

megatron-core's parallel linears (plain F.linear where TP has nothing to do:
models/linear.py), bias-dropout-add and MLP, with the
platform's attention kernel and norm.  The LLM (RMSNorm, SwiGLU, causal) and
the ViT (LayerNorm, quick_gelu, bidirectional within an image) share it: the
differences live in their ``TransformerConfig`` and the mask type.
"""
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mindspeed_mm.models.linear import ColumnLinear, RowLinear
from mindspeed_mm.platform.attention import CoreAttention
from mindspeed_mm.platform.norm import Norm


def transformer_layer_spec(attn_mask_type: AttnMaskType = AttnMaskType.causal) -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnLinear,
                    core_attention=CoreAttention,
                    linear_proj=RowLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnLinear, linear_fc2=RowLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def transformer_block_spec(config,
                           attn_mask_type: AttnMaskType = AttnMaskType.causal) -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus the platform's final norm.

    Given only a layer spec, megatron's TransformerBlock builds its final norm
    from its own ``LayerNormImpl``, which refuses sequence parallelism and
    misses the platform's kernels.
    """
    layers = get_num_layers_to_build(config)
    layer = transformer_layer_spec(attn_mask_type)
    return TransformerBlockSubmodules(layer_specs=[layer] * layers, layer_norm=Norm)
