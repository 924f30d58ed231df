"""Video clips: frame indices, grids and pixels equal Hugging Face's; bad files are dropped
with the right reason; PyAV returns the frames asked for.

HF's ``Qwen2VLVideoProcessor`` cannot be imported here (its module imports torchvision,
whose wheels are broken in this environment), so its ``sample_frames`` and ``patchify``
are compiled from the installed transformers source (they need only math and torch)
and called with a stand-in ``self``.  Frames are read by HF's own ``read_video_pyav``,
and each frame goes through the HF PIL image processor's full call.
"""

import ast
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import mindspeed_mm.data.formats as formats
from mindspeed_mm.data.formats import DropSample
from mindspeed_mm.data.video import (
    VIDEO_DROP_REASONS, VideoInfo, VideoSettings, frame_indices, load_video, probe, read_frames, video_grid,
    video_tokens,
)
from scripts.make_tiny_clips import clip_frames, make_clip, make_tiny_clips

SMALL = dict(min_pixels=28 * 28 * 4, max_pixels=112 * 112)  # tiny clips keep (or nearly keep) their size

# (width, height, frames, clip fps, sampling settings): lengths, sizes, aspect ratios and rates,
# including fewer frames than min_frames, HF's arange quirk (17 frames, n=14 -> 15 indices, the
# last one past the end), an upscale to the default 100352-pixel minimum, and a clip whose
# header has no frame count (WebM).
CASES = {
    "landscape_8fps": (96, 64, 16, 8.0, dict(SMALL)),
    "long_4fps": (64, 48, 24, 4.0, dict(SMALL)),
    "odd_quirk": (112, 84, 17, 17.0, dict(SMALL, fps=14.0)),
    "portrait_3fps": (84, 112, 9, 3.0, dict(SMALL)),
    "three_frames": (64, 48, 3, 24.0, dict(SMALL)),
    "max_frames_6": (96, 64, 20, 10.0, dict(SMALL, fps=8.0, max_frames=6)),
    "default_settings": (64, 48, 8, 8.0, {}),
    "webm_no_count": (96, 64, 12, 10.0, dict(SMALL)),
}


def test_video_drop_reasons_are_counted_reasons():
    assert set(VIDEO_DROP_REASONS) <= set(formats.DROP_REASONS)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    out = {}
    for i, (name, (w, h, n, fps, _)) in enumerate(CASES.items()):
        ext, codec = ("webm", "libvpx") if name.startswith("webm") else ("mp4", "mpeg4")
        out[name] = make_clip(str(root / f"{name}.{ext}"), "right", w, h, n, fps, seed=i, codec=codec)
    return out


@pytest.fixture(scope="module")
def processor():
    import transformers

    return transformers.Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)


def _hf_video_method(name):
    """Qwen2VLVideoProcessor.<name> compiled from the installed transformers source (see the
    module docstring: importing the module needs torchvision); annotations are dropped
    because they name torchvision types."""
    import transformers.models.qwen2_vl as pkg

    path = os.path.join(os.path.dirname(pkg.__file__), "video_processing_qwen2_vl.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Qwen2VLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)
    fn.returns = None
    for arg in fn.args.args + fn.args.kwonlyargs:
        arg.annotation = None
    namespace = {"math": math, "torch": torch}
    exec(compile(ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[])), path, "exec"), namespace)
    return namespace[name]


HF_SAMPLE_FRAMES = _hf_video_method("sample_frames")
HF_PATCHIFY = _hf_video_method("patchify")
HF_SELF = SimpleNamespace(num_frames=None, fps=None, temporal_patch_size=2, min_frames=4, max_frames=768)


def _hf_indices(metadata, settings):
    return HF_SAMPLE_FRAMES(HF_SELF, metadata, temporal_patch_size=2, fps=settings.fps,
                            min_frames=settings.min_frames, max_frames=settings.max_frames)


def _hf_reference(frames, settings, max_pixels, ip):
    """pixel_values_videos, video_grid_thw from decoded frames with HF's functions: the PIL image
    processor's whole call per frame (smart_resize, PIL resize, rescale, normalize) with the
    video pixel bounds, its patches unfolded back to [C, H, W], then the video processor's patchify."""
    p, m, tps = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    size = {"shortest_edge": settings.min_pixels, "longest_edge": max_pixels}
    chw = []
    for frame in frames:
        out = ip(images=[Image.fromarray(frame)], size=size, return_tensors="np")
        _, gh, gw = out["image_grid_thw"][0]
        x = out["pixel_values"].reshape(gh // m, gw // m, m, m, 3, tps, p, p)[:, :, :, :, :, 0]
        chw.append(x.transpose(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p))
    video = torch.from_numpy(np.stack(chw))[None]
    patches, gt, gh, gw = HF_PATCHIFY(HF_SELF, video, patch_size=p, merge_size=m, temporal_patch_size=tps)
    return patches[0].numpy(), np.array([[gt, gh, gw]])


@pytest.mark.parametrize("name", CASES)
def test_indices_grid_and_pixels_match_hf(name, clips, processor):
    from transformers.video_utils import VideoMetadata, read_video_pyav

    path, settings = clips[name], VideoSettings(**CASES[name][4])
    info = probe(path)
    w, h, n, fps, _ = CASES[name]
    assert (info.width, info.height, info.frames, info.fps) == (w, h, n, fps)

    if name.startswith("webm"):
        # HF takes the header's frame count, 0 for WebM (its sampling then divides by zero);
        # ours counts the frames. HF's reader and sampler given the counted total:
        meta = VideoMetadata(total_num_frames=n, fps=fps, width=w, height=h)
        hf_frames, header = read_video_pyav(path, sample_indices_fn=lambda **_: _hf_indices(meta, settings))
        assert header.total_num_frames == 0
    else:
        hf_frames, meta = read_video_pyav(path, sample_indices_fn=lambda metadata, **_: _hf_indices(metadata, settings))
        assert (meta.total_num_frames, meta.fps, meta.width, meta.height) == (n, fps, w, h)
    indices, hf_indices = frame_indices(info, settings), _hf_indices(meta, settings).numpy()
    if name == "odd_quirk":  # HF's arange adds index 17 of a 17-frame clip; its reader skips it
        assert len(hf_indices) == 15 and hf_indices[-1] == 17 and len(hf_frames) == 14
    np.testing.assert_array_equal(indices, hf_indices[hf_indices < n])
    np.testing.assert_array_equal(read_frames(path, indices), hf_frames)

    pixels, grid, sampled = load_video(path, settings, processor)
    assert tuple(grid[0]) == video_grid(info, settings)  # the grid without decoding any pixel
    ref_pixels, ref_grid = _hf_reference(hf_frames, settings, settings.max_pixels, processor)
    np.testing.assert_array_equal(grid, ref_grid)
    assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape
    np.testing.assert_array_equal(pixels, ref_pixels)  # exact: the same HF functions, same order
    assert video_tokens(grid[0]) * 4 == pixels.shape[0]
    assert sampled.sampled_fps == pytest.approx(len(indices) / n * fps)


def test_total_pixel_budget_follows_qwen_vl_utils(clips, processor):
    path = clips["long_4fps"]  # 64x48, 24 frames at 4 fps: 12 frames sampled
    info = probe(path)
    free = VideoSettings(min_pixels=28 * 28, max_pixels=112 * 112, fps=2.0)
    _, h_free, w_free = video_grid(info, free)
    for total in (28 * 28 * 6 * 2, 1):  # a budget that binds; one that hits the 1.05 * min_pixels floor
        capped = VideoSettings(min_pixels=28 * 28, max_pixels=112 * 112, fps=2.0, total_pixels=total)
        n = len(frame_indices(info, capped))
        # qwen-vl-utils fetch_video: max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR),
        #                                int(min_pixels * 1.05))
        max_pixels = max(min(capped.max_pixels, total / n * 2), int(capped.min_pixels * 1.05))
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        rh, rw = smart_resize(info.height, info.width, factor=28, min_pixels=capped.min_pixels, max_pixels=max_pixels)
        t, gh, gw = video_grid(info, capped)
        assert (t, gh, gw) == (n // 2, rh // 14, rw // 14)
        assert gh * gw < h_free * w_free
        pixels, grid, _ = load_video(path, capped, processor)
        assert tuple(grid[0]) == (t, gh, gw)
        frames = read_frames(path, frame_indices(info, capped))
        ref_pixels, ref_grid = _hf_reference(frames, capped, int(max_pixels), processor)
        np.testing.assert_array_equal(grid, ref_grid)
        np.testing.assert_array_equal(pixels, ref_pixels)


@pytest.mark.parametrize("frames", [1, 3, 4, 5])
def test_patchify_equals_hf(frames):
    from mindspeed_mm.data.video import patchify

    x = np.random.default_rng(frames).standard_normal((frames, 3, 56, 84)).astype(np.float32)
    ref, gt, gh, gw = HF_PATCHIFY(HF_SELF, torch.from_numpy(x)[None], patch_size=14, merge_size=2,
                                  temporal_patch_size=2)
    assert (gt, gh, gw) == (-(-frames // 2), 4, 6)  # an odd count padded with the last frame
    np.testing.assert_array_equal(patchify(x, 14, 2, 2), ref[0].numpy())


@pytest.mark.parametrize("direction", ["left", "down"])
def test_read_frames_returns_the_frames_asked_for(tmp_path, direction):
    n = 20
    path = make_clip(str(tmp_path / "c.mp4"), direction, 96, 64, n, 10.0, seed=3)
    drawn = clip_frames(direction, 96, 64, n, seed=3).astype(np.float32)
    indices = [0, 3, 7, 19, 7, 12]  # any order, repeats allowed
    frames = read_frames(path, indices)
    assert frames.dtype == np.uint8 and frames.shape == (len(indices), 64, 96, 3)
    for k, frame in zip(indices, frames):
        errors = np.abs(drawn - frame.astype(np.float32)).mean(axis=(1, 2, 3))
        assert errors.argmin() == k and errors[k] < 3, (k, errors.round(1))
    with pytest.raises(DropSample) as e:
        read_frames(path, [n])  # past the end
    assert e.value.reason == "corrupt_video"
    with pytest.raises(ValueError):
        read_frames(path, [0], backend="opencv")


def _write_audio_only(path):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def test_bad_files_are_dropped_with_their_reason(tmp_path, clips, processor):
    good = clips["landscape_8fps"]
    (tmp_path / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes())
    data = open(good, "rb").read()
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    one_frame = make_clip(str(tmp_path / "one.mp4"), "up", 64, 48, frames=1, fps=8.0)
    cases = {
        str(tmp_path / "missing.mp4"): "missing_video",
        str(tmp_path / "random.mp4"): "corrupt_video",
        str(tmp_path / "truncated.mp4"): "corrupt_video",
        _write_audio_only(tmp_path / "audio.wav"): "no_frames",
        one_frame: "no_frames",  # fewer frames than temporal_patch_size
    }
    settings = VideoSettings(**SMALL)
    for path, reason in cases.items():
        for step in (lambda: video_grid(probe(path), settings), lambda: load_video(path, settings, processor)):
            with pytest.raises(DropSample) as e:
                step()
            assert e.value.reason == reason, (path, str(e.value))
        if path != one_frame:
            with pytest.raises(DropSample) as e:
                read_frames(path, [0])
            assert e.value.reason == reason, path
    with pytest.raises(DropSample) as e:  # aspect ratio over HF's 200
        video_grid(VideoInfo(frames=8, fps=8.0, width=2000, height=8, duration=1.0), settings)
    assert e.value.reason == "bad_aspect_ratio"


def test_settings_defaults_keys_and_validation():
    s = VideoSettings()
    # HF Qwen2VLVideoProcessor (size, min/max_frames) = qwen-vl-utils (VIDEO_MIN/MAX_PIXELS, FPS*).
    assert (s.fps, s.min_frames, s.max_frames, s.min_pixels, s.max_pixels, s.total_pixels) == (
        2.0, 4, 768, 128 * 28 * 28, 768 * 28 * 28, None)
    d = {"video_fps": 1, "video_min_frames": 2, "video_max_frames": 8, "video_min_pixels": 100,
         "video_max_pixels": 200, "video_total_pixels": 1000, "cutoff_len": 5}
    assert VideoSettings.from_dict(d) == VideoSettings(1, 2, 8, 100, 200, 1000)
    assert VideoSettings.from_dict({"video_fps": None}) == VideoSettings()
    bad = [({"video_fps": 0}, "video_fps"), ({"video_fps": "2"}, "video_fps"),
           ({"video_min_frames": 0}, "video_min_frames"), ({"video_max_frames": 2}, "video_max_frames"),
           ({"video_min_pixels": 1.5}, "video_min_pixels"), ({"video_max_pixels": 10}, "video_max_pixels"),
           ({"video_total_pixels": 0}, "video_total_pixels"), ({"video_max_frames": True}, "video_max_frames")]
    for d, key in bad:
        with pytest.raises(ValueError, match=f"^{key} must") as e:
            VideoSettings.from_dict(d)
        assert "\n" not in str(e.value)


def test_make_tiny_clips_writes_mllm_records(tmp_path):
    import json

    path = make_tiny_clips(str(tmp_path), count=4, seed=1)
    records = json.load(open(path))
    assert len(records) == 4
    for r in records:
        (user, answer), (video,) = r["messages"], r["videos"]
        assert user["role"] == "user" and user["content"].startswith("<video>")
        assert answer["role"] == "assistant" and answer["content"] in ("left", "right", "up", "down")
        info = probe(os.path.join(tmp_path, video))
        assert 8 <= info.frames <= 24 and info.width % 2 == 0 and info.height % 2 == 0
