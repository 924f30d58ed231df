"""Image checks at preprocessing time, pixels at load time, both as Hugging Face does them."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from mindspeed_mm.data.formats import DropSample

# HF's own rule for the resized size (multiple of patch*merge, within min/max pixels,
# ValueError above aspect ratio 200), so our grids and token counts are theirs.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize


def to_8bit(im: Image.Image, path: str) -> Image.Image:
    """16-bit grayscale (PIL 'I;16*', or 'I' as older Pillow opens such PNGs) -> 8-bit 'L' by
    keeping the high byte. PIL's own convert('RGB'), which HF's processor applies, clips
    every value above 255 to 255, so such an image would be almost pure white; here we
    differ from HF on purpose. 16-bit RGB PNGs already open as 8-bit 'RGB' (high byte)."""
    if im.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    if im.mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DropSample("corrupt_image", f"{path}: 32-bit integer pixels outside 0..65535 "
                             "(only 8- and 16-bit images are supported)")
        # A PNG in mode 'I' is 16-bit; elsewhere values within 0..255 are taken as 8-bit.
        shift = 8 if im.format == "PNG" or (a.size and a.max() > 255) else 0
        return Image.fromarray((a.astype(np.uint32) >> shift).astype(np.uint8), "L")
    if im.mode == "F":
        raise DropSample("corrupt_image", f"{path}: floating-point pixels (mode F) are not supported")
    return im


def open_image(path: str) -> Image.Image:
    """Fully decode the file: a truncated JPEG only fails when its pixels are read."""
    if not os.path.isfile(path):
        raise DropSample("missing_image", f"{path} not found")
    try:
        im = Image.open(path)
        im.load()  # also closes the file of a single-frame image
    except Exception as e:  # PIL raises many types for bad files
        raise DropSample("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None
    return to_8bit(im, path)


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
