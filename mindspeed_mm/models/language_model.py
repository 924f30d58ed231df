"""Qwen2 language model on megatron-core GPTModel with multimodal RoPE.

Three things differ from a plain GPTModel:

* the input embedding of every ``<|image_pad|>`` token is replaced by the
  next image feature, that of every ``<|video_pad|>`` token by the next
  video feature (done before the sequence-parallel scatter, which is why
  the GPTModel does not scatter its own embedding);
* the vocabulary is padded (multiple of divisible_by x TP): the padded
  logit columns are set to -inf before softmax / cross-entropy / argmax, so
  they carry no probability, exactly like the unpadded HF head;
* under KV-cached inference the attention caches keys already rotated
  (models/rotated_kv_cache.py), so a decode step takes the positions of its
  new tokens only.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import get_pg_size

from mindspeed_mm.constants import IGNORE_INDEX
from mindspeed_mm.errors import UserError
from mindspeed_mm.models.layer_spec import transformer_block_spec
from mindspeed_mm.models.rotated_kv_cache import RotatedKVCacheSelfAttention



def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """In place: -inf on the columns of this rank's vocab shard that lie past the real vocabulary."""
    shard = logits.shape[-1]
    first_padded = vocab_size - tp_rank * shard  # local index of the first padded column
    if first_padded < shard:
        logits[..., max(first_padded, 0):] = float("-inf")
    return logits


def check_vision_tokens(input_ids: torch.Tensor, grid_thw: Optional[torch.Tensor], token_id: int, merge: int,
                        kind: str = "image") -> None:
    """Every sample's ``kind`` tokens ("image" or "video": ``token_id`` in input_ids [b, s]) must match the
    features of its images / videos (``grid_thw`` [n, 3] rows t*h*w/merge**2 each, assigned to samples in
    order; None: no features).  A one-line UserError names the first sample that does not."""
    per_sample = (input_ids == token_id).sum(dim=1).tolist()
    features = [] if grid_thw is None else (grid_thw.prod(-1) // merge ** 2).tolist()
    item = 0
    for b, tokens in enumerate(per_sample):
        have, first = 0, item
        while have < tokens and item < len(features):
            have += features[item]
            item += 1
        if have != tokens:
            raise UserError(f"sample {b}: {tokens} {kind} tokens but {kind}_grid_thw rows {first}..{item - 1} "
                            f"give {have} {kind} features ({kind}s are matched to samples in order)")
    if item != len(features):
        raise UserError(f"{kind}_grid_thw has {len(features)} {kind}s but the {len(per_sample)} samples' "
                        f"{kind} tokens cover only {item} (total tokens {sum(per_sample)}, "
                        f"total features {sum(features)})")


def check_image_tokens(input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor], image_token_id: int,
                       merge: int) -> None:
    """check_vision_tokens for images (kept for its callers)."""
    check_vision_tokens(input_ids, image_grid_thw, image_token_id, merge, "image")


class Qwen2LanguageModel(GPTModel):
    """GPTModel + image/video-feature injection + padded-vocabulary masking."""

    def __init__(self, cfg, config, pre_process: bool, post_process: bool):
        # cfg: the family config (its .text sizes are the Qwen2 decoder's); config: megatron's TransformerConfig
        t = cfg.text
        block = transformer_block_spec(config, AttnMaskType.causal)
        for layer in block.layer_specs:  # a fresh spec: changing it touches no other model
            layer.submodules.self_attention.module = RotatedKVCacheSelfAttention
        super().__init__(
            config, block,
            vocab_size=t.padded_vocab_size(config.tensor_model_parallel_size),
            max_sequence_length=t.max_position_embeddings, pre_process=pre_process, post_process=post_process,
            parallel_output=True, share_embeddings_and_output_weights=t.tie_word_embeddings,
            position_embedding_type="mrope", rotary_base=t.rope_theta,
            scatter_embedding_sequence_parallel=False)
        self.real_vocab_size = t.vocab_size
        self.image_token_id = cfg.image_token_id
        self.video_token_id = cfg.video_token_id

    def embed(self, input_ids: torch.Tensor, image_features: Optional[torch.Tensor],
              video_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token embeddings [s, b, h] (scattered under SP) from input_ids [b, s], with image_features
        [n_image_tokens, h] in place of the image tokens and video_features [n_video_tokens, h] in place
        of the video tokens, each in order (row-major over the batch)."""
        emb = self.embedding.word_embeddings(input_ids)  # [b, s, h], all-reduced over TP
        for token_id, features in ((self.image_token_id, image_features), (self.video_token_id, video_features)):
            if features is not None:
                mask = (input_ids == token_id).unsqueeze(-1)
                emb = emb.masked_scatter(mask, features.to(emb.dtype))
        emb = emb.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
        return emb

    def _tp_rank(self) -> int:
        return self.pg_collection.tp.rank() if torch.distributed.is_initialized() else 0

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy [b, s] (fp32); labels already shifted, -100 gives 0."""
        mask_padded_vocab(logits, self.real_vocab_size, self._tp_rank())
        if get_pg_size(self.pg_collection.tp) == 1:
            # The whole vocabulary is here: torch's cross-entropy (HF's), not the vocab-parallel one (its
            # three all-reduces and a dozen ops per micro-batch are pure overhead at TP 1).
            s, b, v = logits.shape
            loss = F.cross_entropy(logits.float().reshape(s * b, v), labels.t().reshape(s * b), reduction="none",
                                   ignore_index=IGNORE_INDEX)
            return loss.view(s, b).t().contiguous()
        ignored = labels == IGNORE_INDEX
        loss = super().compute_language_model_loss(labels.masked_fill(ignored, 0), logits.float())
        return loss.masked_fill(ignored, 0.0)

    def forward(self, input_ids, position_ids, attention_mask, decoder_input=None, labels=None, **kwargs):
        out = super().forward(input_ids, position_ids, attention_mask, decoder_input=decoder_input,
                              labels=labels, **kwargs)
        if self.post_process and labels is None:
            # logits [b, s, V/TP], or the whole padded vocabulary on every rank when gathered (inference)
            gathered = kwargs.get("runtime_gather_output") and out.shape[-1] == self.vocab_size
            mask_padded_vocab(out, self.real_vocab_size, 0 if gathered else self._tp_rank())
        return out
