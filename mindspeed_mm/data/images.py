"""Image checks at preprocessing time, pixels at load time, both as Hugging Face does them."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from mindspeed_mm.data.formats import DropSample

# HF's own rule for the resized size (multiple of patch*merge, within min/max pixels,
# ValueError above aspect ratio 200), so our grids and token counts are theirs.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


def open_image(path: str) -> Image.Image:
    """Fully decode the file: a truncated JPEG only fails when its pixels are read."""
    if not os.path.isfile(path):
        raise DropSample("missing_image", f"{path} not found")
    try:
        im = Image.open(path)
        im.load()  # also closes the file of a single-frame image
        return im
    except Exception as e:  # PIL raises many types for bad files
        raise DropSample("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None


def image_grid(image: Image.Image, image_processor) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) that the HF image processor gives this image."""
    p, m = image_processor.patch_size, image_processor.merge_size
    w, h = image.size
    try:
        rh, rw = smart_resize(h, w, factor=p * m, min_pixels=image_processor.size["shortest_edge"],
                              max_pixels=image_processor.size["longest_edge"])
    except (ValueError, ZeroDivisionError) as e:
        raise DropSample("bad_aspect_ratio", f"{w}x{h}: {e}") from None
    return 1, rh // p, rw // p


def check_images(paths: list[str], image_processor) -> list[tuple[int, int, int]]:
    return [image_grid(open_image(p), image_processor) for p in paths]


def load_pixels(paths: list[str], image_processor) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values [patches, C*T*P*P] float32 and image_grid_thw [n, 3], from the HF processor."""
    images = [open_image(p) for p in paths]
    out = image_processor(images=images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]
