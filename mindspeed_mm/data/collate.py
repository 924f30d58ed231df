"""Micro-batch collation: right padding to the longest sample (or a multiple of it, or a fixed length)."""

from __future__ import annotations

import torch

from mindspeed_mm.constants import IGNORE_INDEX


class Qwen2VLCollator:
    """Samples from Qwen2VLDataset -> the batch dict the training loop consumes:
    input_ids / labels / attention_mask / mm_token_type_ids [b, s], position_ids [3, b, s],
    pixel_values [patches, 1176] and image_grid_thw [n_images, 3] (None without images).
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
        pixels = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        grids = [s["image_grid_thw"] for s in samples if s["image_grid_thw"] is not None]
        batch["pixel_values"] = torch.cat(pixels) if pixels else None
        batch["image_grid_thw"] = torch.cat(grids) if grids else None
        return batch
