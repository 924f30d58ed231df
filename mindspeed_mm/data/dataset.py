"""Training dataset over a preprocessing cache: tokens from the cache, pixels (images, video frames) on the fly."""

from __future__ import annotations

import logging

import numpy as np
import torch

from mindspeed_mm.data.cache import CachedSamples
from mindspeed_mm.data.formats import DropSample
from mindspeed_mm.data.images import load_pixels
from mindspeed_mm.data.positions import VisionTokenIds, sample_position_ids
from mindspeed_mm.data.video import VideoSettings, load_videos

logger = logging.getLogger(__name__)


class Qwen2VLDataset(torch.utils.data.Dataset):
    """Item i: input_ids, labels, position_ids [3, s], mm_token_type_ids (HF's: 0 text, 1 image, 2 video),
    pixel_values / image_grid_thw (None without images) and pixel_values_videos / video_grid_thw (None
    without video clips)."""

    def __init__(self, cache: CachedSamples, image_processor, ids: VisionTokenIds, pad_token_id: int,
                 indices=None, video_settings: VideoSettings | None = None):
        self.cache, self.image_processor, self.ids = cache, image_processor, ids
        self.video_settings = video_settings or VideoSettings()
        # The cache samples in use (None: all); e.g. those within --seq-length.
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.pad_token_id = pad_token_id
        self._warned = False

    def __len__(self) -> int:
        return len(self.cache) if self.indices is None else len(self.indices)

    def sample_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(LLM tokens, ViT patches) of every item, from the cache (what packing plans with)."""
        lengths, patches = self.cache.lengths(), self.cache.patches()
        if self.indices is None:
            return lengths, patches
        return lengths[self.indices], patches[self.indices]

    def _item(self, i: int) -> dict:
        input_ids, labels, images, grid = self.cache.sample(i if self.indices is None else int(self.indices[i]))
        pixel_values = image_grid_thw = None
        if images:
            pixels, hf_grid = load_pixels(images, self.image_processor)
            if not np.array_equal(hf_grid, grid):
                raise DropSample("corrupt_image", f"{images}: image changed on disk since preprocessing")
            pixel_values, image_grid_thw = torch.from_numpy(pixels), torch.from_numpy(grid.astype(np.int64))
        videos, video_grid = self.cache.sample_videos(i if self.indices is None else int(self.indices[i]))
        pixel_values_videos = video_grid_thw = None
        seconds = []  # per clip: the seconds one temporal patch spans (Qwen2.5-VL's positions)
        if videos:
            pixels, loaded, seconds = load_videos(videos, self.video_settings, self.image_processor)
            if not np.array_equal(loaded, video_grid):
                raise DropSample("corrupt_video", f"{videos}: clip changed on disk since preprocessing")
            pixel_values_videos = torch.from_numpy(pixels)
            video_grid_thw = torch.from_numpy(loaded.astype(np.int64))
        ids = torch.from_numpy(input_ids.astype(np.int64))
        return {
            "input_ids": ids,
            "labels": torch.from_numpy(labels.astype(np.int64)),
            "position_ids": sample_position_ids(input_ids, grid, self.ids, video_grid, seconds),
            "mm_token_type_ids": (ids == self.ids.image_token_id).long() + 2 * (ids == self.ids.video_token_id).long(),
            "pixel_values": pixel_values,
            "image_grid_thw": image_grid_thw,
            "pixel_values_videos": pixel_values_videos,
            "video_grid_thw": video_grid_thw,
        }

    def __getitem__(self, i: int) -> dict:
        # An image checked at preprocessing can still vanish or change later; training
        # goes on with the next sample rather than dying hours into a run.
        for k in range(min(len(self), 16)):
            try:
                return self._item((i + k) % len(self))
            except DropSample as d:
                if not self._warned:
                    logger.warning("data: sample %d unusable at load time (%s: %s); using the next one "
                                   "(further cases not reported)", i + k, d.reason, d)
                    self._warned = True
        raise RuntimeError(f"data: 16 consecutive samples from {i} failed to load; are the images gone?")
