"""Video clips -> Qwen2-VL's ``pixel_values_videos`` and ``video_grid_thw``, as Hugging Face builds them.

Whose rule is which (HF = transformers ``Qwen2VLVideoProcessor`` unless said otherwise):

* Frame count and indices: HF ``sample_frames`` in fps mode, op for op::

      max_frames' = floor(min(max_frames, total) / tps) * tps          # tps = temporal_patch_size
      n = floor(min(max(total / video_fps * fps, min_frames), max_frames', total) / tps) * tps
      indices = torch.arange(0, total, total / n).int()

  (its float32 rounding decides each index).  For some (total, n) that arange adds an
  (n+1)-th index equal to ``total`` (17 frames, n = 14 -> ..., 15, 17): no such frame exists;
  HF's ``read_video_pyav`` skips it, HF's default torchcodec reader fails on it.  We drop it,
  so the frames are HF pyav's.  qwen-vl-utils' ``smart_nframes`` gives the same n but other
  indices (``linspace(0, total - 1, n).round()``); not followed.
  Fewer than ``tps`` frames (n = 0; HF divides by zero, qwen-vl-utils raises): ``no_frames``.
* Defaults: fps 2.0 is qwen-vl-utils' ``FPS`` (HF's class samples nothing unless given an fps);
  min/max frames 4/768 and min/max pixels 128*28*28 / 768*28*28 are both HF's video processor
  defaults and qwen-vl-utils' ``FPS_MIN_FRAMES``/``FPS_MAX_FRAMES``/``VIDEO_MIN_PIXELS``/``VIDEO_MAX_PIXELS``.
* Frame size: HF ``smart_resize(h, w, factor=patch*merge, min_pixels, max_pixels)``.
* Total-pixel budget (``video_total_pixels``, off by default): qwen-vl-utils ``fetch_video``'s
  per-frame bound ``max(min(max_pixels, total_pixels / n * tps), int(min_pixels * 1.05))``, n the
  sampled frame count.  HF's opt-in ``cap_pixels_per_frame`` is the same rule with an integer
  division (``total * tps // n``) and a budget given in tokens.
* Resize, rescale, normalize: HF's PIL image processor's functions per frame (PIL resize with
  the processor's ``resample``, bicubic), not the video processor's torchvision resize, which
  cannot be imported here and rounds differently.
* Patchify: HF ``patchify`` (pad to a multiple of tps by repeating the last frame, then
  reshape/permute), reproduced in numpy.
* Decoding: PyAV ``rgb24`` frames, frame count and ``average_rate`` from the stream header as
  HF ``read_video_pyav``; when the header has no count (WebM/MKV) the frames are decode-counted.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers.image_transforms import resize as hf_resize
from transformers.image_utils import ChannelDimension

from mindspeed_mm.data.config import VideoSettings
from mindspeed_mm.data.formats import DropSample

# HF's own rule for the resized size, so grids and token counts are theirs.
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

# Reasons this module raises DropSample with; formats.DROP_REASONS must list them.
VIDEO_DROP_REASONS = ("missing_video", "corrupt_video", "no_frames", "video_too_long")

BACKENDS = ("auto", "av", "decord")


@dataclass(frozen=True)
class VideoInfo:
    frames: int      # frames in the stream (header count, else decode-counted)
    fps: float       # the stream's average frame rate
    width: int
    height: int
    duration: float  # frames / fps, as HF's VideoMetadata


@dataclass(frozen=True)
class VideoSampling:
    """What load_video sampled: the probed clip, the frame indices, and HF's ``sampled_fps``."""

    info: VideoInfo
    indices: np.ndarray
    sampled_fps: float


def _open(path: str):
    import av  # here: only video users need PyAV

    if not os.path.isfile(path):
        raise DropSample("missing_video", f"{path} not found")
    try:
        return av.open(path)
    except Exception as e:  # PyAV raises many FFmpeg error types for unreadable files
        raise DropSample("corrupt_video", f"{path}: {type(e).__name__}: {e}") from None


def _video_stream(container, path: str):
    if not container.streams.video:
        raise DropSample("no_frames", f"{path}: no video stream")
    return container.streams.video[0]


def probe(path: str) -> VideoInfo:
    """Frame count, fps and size from the container header; decodes only when the header has no count."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        frames = stream.frames
        rate = stream.average_rate or stream.guessed_rate
        width, height = stream.codec_context.width, stream.codec_context.height
        if not frames:
            try:
                frames = sum(1 for _ in container.decode(stream))
            except Exception as e:
                raise DropSample("corrupt_video", f"{path}: {type(e).__name__}: {e}") from None
    if not frames:
        raise DropSample("no_frames", f"{path}: no decodable video frame")
    if not rate or not width or not height:
        raise DropSample("corrupt_video", f"{path}: no frame rate or frame size in the stream header")
    fps = float(rate)
    return VideoInfo(frames=int(frames), fps=fps, width=int(width), height=int(height), duration=frames / fps)


def frame_indices(info: VideoInfo, settings: VideoSettings, temporal_patch_size: int = 2) -> np.ndarray:
    """HF ``Qwen2VLVideoProcessor.sample_frames`` (fps mode); see the module docstring."""
    tps, total = temporal_patch_size, info.frames
    max_frames = math.floor(min(settings.max_frames, total) / tps) * tps
    n = total / info.fps * settings.fps
    n = min(max(n, settings.min_frames), max_frames, total)
    n = math.floor(n / tps) * tps
    if n <= 0:
        raise DropSample("no_frames", f"{total} frame(s); at least {tps} are needed")
    # torch, not numpy: HF's float32 arange decides the rounding of each index.
    indices = torch.arange(0, total, total / n).int().numpy().astype(np.int64)
    return indices[indices < total]  # the index past the end that arange sometimes adds


def frame_size(height: int, width: int, num_frames: int, settings: VideoSettings,
               factor: int = 28, temporal_patch_size: int = 2) -> tuple[int, int]:
    """(height, width) every sampled frame is resized to; the total budget per qwen-vl-utils."""
    max_pixels = settings.max_pixels
    if settings.total_pixels is not None:
        max_pixels = max(min(max_pixels, settings.total_pixels / num_frames * temporal_patch_size),
                         int(settings.min_pixels * 1.05))
    try:
        return smart_resize(height, width, factor=factor, min_pixels=settings.min_pixels, max_pixels=max_pixels)
    except (ValueError, ZeroDivisionError) as e:
        raise DropSample("bad_aspect_ratio", f"video {width}x{height}: {e}") from None


def video_grid(info: VideoInfo, settings: VideoSettings, patch_size: int = 14, merge_size: int = 2,
               temporal_patch_size: int = 2) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) of load_video, from the header alone (no pixels decoded)."""
    n = len(frame_indices(info, settings, temporal_patch_size))
    h, w = frame_size(info.height, info.width, n, settings, patch_size * merge_size, temporal_patch_size)
    return -(-n // temporal_patch_size), h // patch_size, w // patch_size


def video_tokens(grid: Sequence[int], merge_size: int = 2) -> int:
    """<|video_pad|> tokens of one clip."""
    t, h, w = grid
    return t * h * w // merge_size ** 2


def _pick_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"video backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "decord" if importlib.util.find_spec("decord") is not None else "av"
    return backend


def _read_av(path: str, indices: np.ndarray) -> list[np.ndarray]:
    wanted, last, kept, decoded = set(indices.tolist()), int(indices.max()), {}, 0
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"  # frame threads: same frames, faster
        try:
            # One sequential pass: seeking per frame lands on keyframes and costs more.
            for frame in container.decode(stream):
                if decoded in wanted:
                    kept[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
                if decoded > last:
                    break
        except Exception as e:
            raise DropSample("corrupt_video", f"{path}: frame {decoded}: {type(e).__name__}: {e}") from None
    if not decoded:
        raise DropSample("no_frames", f"{path}: no decodable video frame")
    if decoded <= last:
        raise DropSample("corrupt_video", f"{path}: only {decoded} frames decodable, frame {last} wanted")
    return [kept[i] for i in indices.tolist()]


def _read_decord(path: str, indices: np.ndarray) -> list[np.ndarray]:
    import decord

    if not os.path.isfile(path):
        raise DropSample("missing_video", f"{path} not found")
    try:
        reader = decord.VideoReader(path, num_threads=1)
        n = len(reader)
    except Exception as e:
        raise DropSample("corrupt_video", f"{path}: {type(e).__name__}: {e}") from None
    if not n:
        raise DropSample("no_frames", f"{path}: no decodable video frame")
    if int(indices.max()) >= n:
        raise DropSample("corrupt_video", f"{path}: only {n} frames, frame {int(indices.max())} wanted")
    try:
        return list(reader.get_batch(indices.tolist()).asnumpy())
    except Exception as e:
        raise DropSample("corrupt_video", f"{path}: {type(e).__name__}: {e}") from None


def read_frames(path: str, indices: Sequence[int] | np.ndarray, backend: str = "av") -> np.ndarray:
    """uint8 [T, H, W, 3] RGB frames at ``indices`` (any order, repeats allowed), decoded in one pass."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not indices.size or indices.min() < 0:
        raise ValueError(f"frame indices must be a non-empty list of indices >= 0, got {indices.tolist()}")
    frames = (_read_decord if _pick_backend(backend) == "decord" else _read_av)(path, indices)
    if len({f.shape for f in frames}) != 1:
        raise DropSample("corrupt_video", f"{path}: frames change size mid-stream")
    return np.stack(frames)


def patchify(frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """[T, C, H, W] -> [grid_t*grid_h*grid_w, C*tps*P*P]: HF Qwen2VLVideoProcessor.patchify in numpy."""
    if pad := -frames.shape[0] % temporal_patch_size:  # HF repeats the last frame
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    t, c, h, w = frames.shape
    p, m, tps = patch_size, merge_size, temporal_patch_size
    gt, gh, gw = t // tps, h // p, w // p
    x = frames.reshape(gt, tps, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # HF's permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9) without batch
    return np.ascontiguousarray(x).reshape(gt * gh * gw, c * tps * p * p)


def load_video(path: str, settings: VideoSettings, image_processor,
               backend: str = "av") -> tuple[np.ndarray, np.ndarray, VideoSampling]:
    """pixel_values_videos float32 [t*h*w, C*tps*P*P], video_grid_thw int64 [1, 3], what was sampled.

    ``image_processor`` is HF's PIL ``Qwen2VLImageProcessor``: patch/merge/temporal sizes,
    resample, rescale factor, mean and std come from it; pixel bounds from ``settings``."""
    ip = image_processor
    p, m, tps = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    info = probe(path)
    indices = frame_indices(info, settings, tps)
    frames = read_frames(path, indices, backend)
    if frames.shape[1:3] != (info.height, info.width):
        # video_grid (preprocessing) sized the clip from the header; the pixels must agree.
        raise DropSample("corrupt_video", f"{path}: header says {info.width}x{info.height}, "
                         f"frames are {frames.shape[2]}x{frames.shape[1]}")
    h, w = frame_size(info.height, info.width, len(indices), settings, p * m, tps)
    out = []
    for frame in frames:  # the PIL image processor's steps, per frame, as for an image
        x = hf_resize(np.moveaxis(frame, -1, 0), (h, w), resample=ip.resample,
                      data_format=ChannelDimension.FIRST, input_data_format=ChannelDimension.FIRST)
        if ip.do_rescale:
            x = ip.rescale(x, ip.rescale_factor)
        if ip.do_normalize:
            x = ip.normalize(x, ip.image_mean, ip.image_std)
        out.append(np.asarray(x, dtype=np.float32))
    pixel_values = patchify(np.stack(out), p, m, tps)
    grid = np.array([[-(-len(indices) // tps), h // p, w // p]], dtype=np.int64)
    sampled_fps = len(indices) / info.frames * info.fps  # HF VideoMetadata.sampled_fps
    return pixel_values, grid, VideoSampling(info, indices, sampled_fps)


def load_videos(paths: Sequence[str], settings: VideoSettings, image_processor,
                backend: str = "av") -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The clips of a sample or batch, in order: pixel_values_videos, video_grid_thw [n, 3] and, per clip,
    the seconds one temporal patch spans (HF Qwen2_5_VLProcessor's second_per_grid_ts:
    temporal_patch_size / sampled fps; Qwen2.5-VL's positions use it)."""
    clips = [load_video(p, settings, image_processor, backend) for p in paths]
    seconds = [image_processor.temporal_patch_size / s.sampled_fps for _, _, s in clips]
    return np.concatenate([p for p, _, _ in clips]), np.concatenate([g for _, g, _ in clips]), seconds
