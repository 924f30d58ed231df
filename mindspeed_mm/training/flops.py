"""Model FLOPs of one batch, counted on its real (unpadded) tokens.

Matrix multiplies only (2 FLOPs per multiply-add), per part of the model:

* vision encoder: patch embedding, per layer QKV / projection / MLP per patch,
  and bidirectional attention within each frame (``h*w`` patches of each of
  the ``t`` frames of an image, as Qwen2-VL's ``cu_seqlens``);
* projector: the patch merger's two linears per merged token;
* language model: per layer QKV (GQA) / projection / SwiGLU MLP per token,
  causal attention on each sample's real length, and the output layer.

Backward costs 2x forward for a trainable part (input and weight gradients),
1x for a frozen part that still has to pass gradients to a trainable part in
front of it, 0 for a frozen part with nothing trainable before it.
Activation recomputation is not counted: this is model FLOPs, as in MFU.
"""
from dataclasses import dataclass

import torch


@dataclass
class BatchShape:
    """What the FLOPs depend on: real sample lengths and image grids."""
    lengths: list  # real token count of every sample
    grids: list  # [t, h, w] (patches) of every image and video clip (the ViT attends within each frame)

    @classmethod
    def of(cls, batch: dict) -> "BatchShape":
        """A padded batch [b, s], or a packed row (``cu_seqlens``: its samples, the padding segment left out)."""
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        cu = batch.get("cu_seqlens")
        if cu is not None:
            segments = (cu[1:] - cu[:-1]).tolist()
            real, lengths = lengths[0], []
            for n in segments:
                if real <= 0:
                    break
                lengths.append(n)
                real -= n
        grids = [row for key in ("image_grid_thw", "video_grid_thw") if isinstance(batch.get(key), torch.Tensor)
                 for row in batch[key].tolist()]
        return cls(lengths, grids)


def _attention_pairs(length: int, causal: bool) -> int:
    return length * (length + 1) // 2 if causal else length * length


def forward_flops(cfg, shape: BatchShape, padded_vocab: int):
    """Forward FLOPs per part: {'vision': ..., 'projector': ..., 'language': ...}."""
    v, t = cfg.vision, cfg.text
    d, merge = v.hidden_size, v.spatial_merge_size ** 2
    patch_in = v.in_channels * v.temporal_patch_size * v.patch_size ** 2

    patches = sum(tt * hh * ww for tt, hh, ww in shape.grids)
    vit_pairs = sum(tt * _attention_pairs(hh * ww, causal=False) for tt, hh, ww in shape.grids)
    vit_layer = 2 * patches * (3 * d * d + d * d + 2 * d * v.ffn_hidden_size) + 2 * 2 * d * vit_pairs
    vision = 2 * patches * patch_in * d + v.num_layers * vit_layer
    merged = patches // merge
    projector = 2 * merged * (merge * d * merge * d + merge * d * t.hidden_size)

    h, kv = t.hidden_size, t.num_query_groups * t.kv_channels
    tokens = sum(shape.lengths)
    llm_pairs = sum(_attention_pairs(n, causal=True) for n in shape.lengths)
    llm_layer = 2 * tokens * (h * (h + 2 * kv) + h * h + 3 * h * t.ffn_hidden_size) + 2 * 2 * h * llm_pairs
    language = t.num_layers * llm_layer + 2 * tokens * h * padded_vocab
    return {"vision": vision, "projector": projector, "language": language}


def train_flops(cfg, shape: BatchShape, padded_vocab: int) -> int:
    """Forward + backward FLOPs of one training step on this batch."""
    fwd = forward_flops(cfg, shape, padded_vocab)
    trainable = {"vision": not cfg.freeze_vision_encoder, "projector": not cfg.freeze_vision_projector,
                 "language": not cfg.freeze_language_model}
    total, upstream_trainable = 0, False
    for part in ("vision", "projector", "language"):  # the order activations flow in
        backward = (1 if trainable[part] else 0) + (1 if trainable[part] or upstream_trainable else 0)
        total += fwd[part] * (1 + backward)
        upstream_trainable = upstream_trainable or trainable[part]
    return total
