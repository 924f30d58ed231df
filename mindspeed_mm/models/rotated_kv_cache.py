"""Self-attention whose inference KV cache holds keys already rotated by RoPE.

megatron-core's static-batching cache (``StaticInferenceContext``) stores
keys before rotation and, at every decode step, rotates the whole cached
prefix again with the rotary embedding of every position so far: O(length)
extra work per layer and step, and the caller has to pass the positions of
the whole sequence each time.  RoPE acts on each position independently, so
rotating every key once, before it enters the cache, leaves the cached keys
bit-for-bit what megatron would rotate them to; a step then rotates only its
new tokens and needs only their positions.

Outside inference (``inference_context`` None: training, evaluation) this is
megatron's ``SelfAttention`` unchanged.
"""
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention


class RotatedKVCacheSelfAttention(SelfAttention):
    """With a static inference context: ``rotary_pos_emb`` covers the new tokens only ([sq, b, 1, d])."""

    def _adjust_key_value_for_inference(self, inference_context, query, key, value, rotary_pos_emb, *args,
                                        **kwargs):
        if (inference_context is None or not inference_context.is_static_batching() or rotary_pos_emb is None
                or self.config.flash_decode):
            return super()._adjust_key_value_for_inference(inference_context, query, key, value, rotary_pos_emb,
                                                           *args, **kwargs)
        q_emb, k_emb = rotary_pos_emb
        if k_emb.shape[0] != key.shape[0]:
            raise ValueError(f"KV-cached inference: position_ids must cover the {key.shape[0]} new tokens only, "
                             f"got {k_emb.shape[0]} positions")
        # the same call megatron makes for the keys, on the new keys only: key [sq, b, kv_heads, hd]
        key = apply_rotary_pos_emb(key, k_emb, config=self.config,
                                   mscale=_yarn_get_concentration_factor_from_config(self.config),
                                   cp_group=self.pg_collection.cp)
        query, key, value, _, mask_type, block_table = super()._adjust_key_value_for_inference(
            inference_context, query, key, value, None, *args, **kwargs)
        return query, key, value, (q_emb, None), mask_type, block_table  # megatron rotates the query only
