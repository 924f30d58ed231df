"""Micro-batch collation: right padding to the longest sample (or a multiple of it, or a fixed length),
or, under packing, the samples of a micro-batch concatenated into one row with their boundaries."""

from __future__ import annotations

import torch

from mindspeed_mm.constants import IGNORE_INDEX


VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def add_vision(batch: dict, samples: list[dict]) -> dict:
    """The samples' pixels and grids, concatenated in sample order (None when no sample has any)."""
    for key in VISION_KEYS:
        parts = [s[key] for s in samples if s.get(key) is not None]
        batch[key] = torch.cat(parts) if parts else None
    return batch


class Qwen2VLCollator:
    """Samples from Qwen2VLDataset -> the batch dict the training loop consumes:
    input_ids / labels / attention_mask / mm_token_type_ids [b, s], position_ids [3, b, s],
    pixel_values [patches, 1176] and image_grid_thw [n_images, 3] (None without images), pixel_values_videos
    [video patches, 1176] and video_grid_thw [n_videos, 3] (None without video clips).
    Labels are aligned with input_ids (not shifted)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, ignore_pad_token_for_loss: bool = True,
                 min_length: int = 0):
        self.pad_token_id = pad_token_id
        self.multiple = max(1, pad_to_multiple_of)
        self.min_length = min_length  # fixed-shape batches (--seq-length without --variable-seq-lengths)
        self.label_pad = IGNORE_INDEX if ignore_pad_token_for_loss else pad_token_id

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(self.min_length, max(len(s["input_ids"]) for s in samples))
        seq = -(-longest // self.multiple) * self.multiple  # sequence parallelism needs s % tp == 0
        b = len(samples)
        batch = {
            "input_ids": torch.full((b, seq), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((b, seq), self.label_pad, dtype=torch.long),
            "attention_mask": torch.zeros((b, seq), dtype=torch.long),
            "mm_token_type_ids": torch.zeros((b, seq), dtype=torch.long),
            "position_ids": torch.zeros((3, b, seq), dtype=torch.long),
        }
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            batch["input_ids"][i, :n] = s["input_ids"]
            batch["labels"][i, :n] = s["labels"]
            batch["attention_mask"][i, :n] = 1
            batch["mm_token_type_ids"][i, :n] = s["mm_token_type_ids"]
            batch["position_ids"][:, i, :n] = s["position_ids"]
        return add_vision(batch, samples)


class PackedCollator:
    """Samples of one micro-batch -> ONE row of independent sequences (sequence packing).

    Keys as Qwen2VLCollator's with b = 1, plus ``cu_seqlens`` int32 [n + 1] (0, n1, n1 + n2, ..., T): the
    model attends within each sample only.  Each sample keeps its own M-RoPE positions (they restart at
    0), and its first label is ignored, so no token is trained to predict the next sample's first one;
    the loss of the row is then the sum of the samples' unpacked losses.  The row is right-padded to a
    multiple of ``pad_to_multiple_of`` (sequence parallelism) and to at least ``min_length`` (fixed
    shapes); the padding forms a last segment of its own, with ignored labels.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1, min_length: int = 0):
        self.pad_token_id, self.multiple, self.min_length = pad_token_id, max(1, pad_to_multiple_of), min_length

    def __call__(self, samples: list[dict]) -> dict:
        lengths = [len(s["input_ids"]) for s in samples]
        real = sum(lengths)
        total = -(-max(real, self.min_length) // self.multiple) * self.multiple
        pad = total - real
        labels = [s["labels"].clone() for s in samples]
        for label in labels:
            label[0] = IGNORE_INDEX
        cat = lambda key, fill, dtype=torch.long: torch.cat(  # noqa: E731
            [s[key] for s in samples] + [torch.full((pad,), fill, dtype=dtype)])
        bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()] + ([total] if pad else [])
        batch = {
            "input_ids": cat("input_ids", self.pad_token_id)[None],
            "labels": torch.cat(labels + [torch.full((pad,), IGNORE_INDEX, dtype=torch.long)])[None],
            "attention_mask": torch.cat([torch.ones(real, dtype=torch.long), torch.zeros(pad, dtype=torch.long)])[None],
            "mm_token_type_ids": cat("mm_token_type_ids", 0)[None],
            "position_ids": torch.cat([s["position_ids"] for s in samples]
                                      + [torch.zeros((3, pad), dtype=torch.long)], dim=1)[:, None],
            "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        }
        return add_vision(batch, samples)
