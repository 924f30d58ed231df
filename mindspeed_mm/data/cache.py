"""On-disk cache of preprocessed samples: flat numpy arrays plus a meta.json.

Layout of `<cache_dir>/qwen2vl-<key>/`: input_ids.npy and labels.npy (all samples
concatenated, int32), sample_offsets.npy (int64 [n+1]), image_grid_thw.npy (int32
[n_images, 3]), image_offsets.npy (int64 [n+1]), images.json (paths), the same three for
video clips (video_grid_thw.npy, video_offsets.npy, videos.json), meta.json (drop counts,
build time). A cache is written to a temp folder and renamed into place, so a
folder that exists is complete. Image files themselves are not hashed into the key.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict

import numpy as np

from mindspeed_mm.data.preprocess import PreprocessSettings, Sample
from mindspeed_mm.jsonio import replace_dir

# Bumped whenever preprocessing gives other tokens or lengths for the same inputs, so that an old
# cache is rebuilt: 2 = answers tokenized apart from their prompt, 16-bit images scaled to 8 bits;
# 3 = video clips.
CACHE_FORMAT_VERSION = 3
# Files of a HF model folder that shape tokens or pixels (weights are irrelevant here).
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                    "special_tokens_map.json", "vocab.json", "merges.txt", "preprocessor_config.json")


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(data_files: list[str], settings: PreprocessSettings, max_samples: int | None) -> str:
    model = settings.model_name_or_path
    material = {
        "version": CACHE_FORMAT_VERSION,
        "data": [[os.path.abspath(p), _file_digest(p)] for p in data_files],
        "processor": {n: _file_digest(os.path.join(model, n)) for n in _PROCESSOR_FILES
                      if os.path.isfile(os.path.join(model, n))},
        "settings": {**asdict(settings), "model_name_or_path": os.path.abspath(model),
                     "media_dir": os.path.abspath(settings.media_dir)},
        "max_samples": max_samples,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def write_cache(path: str, samples: list[Sample], meta: dict) -> None:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".building-")
    lengths = [len(s.input_ids) for s in samples]
    cat = lambda arrs, dt: np.concatenate(arrs).astype(dt) if arrs else np.zeros(0, dt)  # noqa: E731
    np.save(os.path.join(tmp, "input_ids.npy"), cat([s.input_ids for s in samples], np.int32))
    np.save(os.path.join(tmp, "labels.npy"), cat([s.labels for s in samples], np.int32))
    np.save(os.path.join(tmp, "sample_offsets.npy"), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    for kind in ("image", "video"):
        paths = [getattr(s, f"{kind}s") for s in samples]
        np.save(os.path.join(tmp, f"{kind}_offsets.npy"),
                np.concatenate([[0], np.cumsum([len(p) for p in paths])]).astype(np.int64))
        grids = [getattr(s, f"{kind}_grid_thw") for s, p in zip(samples, paths) if p]
        np.save(os.path.join(tmp, f"{kind}_grid_thw.npy"),
                np.concatenate(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32))
        with open(os.path.join(tmp, f"{kind}s.json"), "w") as f:
            json.dump([x for p in paths for x in p], f)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**meta, "num_samples": len(samples), "created": time.time()}, f)
    replace_dir(tmp, path)  # overwrite_cache swaps the old one out


class CachedSamples:
    """Read-only, memory-mapped view of a cache folder."""

    def __init__(self, path: str):
        load = lambda n: np.load(os.path.join(path, n), mmap_mode="r")  # noqa: E731
        self.path = path
        self.input_ids, self.labels = load("input_ids.npy"), load("labels.npy")
        self.sample_offsets, self.image_offsets = load("sample_offsets.npy"), load("image_offsets.npy")
        self.image_grid_thw = load("image_grid_thw.npy")
        self.video_offsets, self.video_grid_thw = load("video_offsets.npy"), load("video_grid_thw.npy")
        with open(os.path.join(path, "images.json")) as f:
            self.images = json.load(f)
        with open(os.path.join(path, "videos.json")) as f:
            self.videos = json.load(f)
        with open(os.path.join(path, "meta.json")) as f:
            self.meta = json.load(f)

    def __len__(self) -> int:
        return len(self.sample_offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.sample_offsets)

    def patches(self) -> np.ndarray:
        """ViT patches (t * h * w over the sample's images and video clips) of every sample."""
        total = 0
        for grids, offsets in ((self.image_grid_thw, self.image_offsets), (self.video_grid_thw, self.video_offsets)):
            per_item = np.prod(np.asarray(grids, np.int64).reshape(-1, 3), axis=1)
            cum = np.concatenate([[0], np.cumsum(per_item)])
            total = total + cum[np.asarray(offsets[1:])] - cum[np.asarray(offsets[:-1])]
        return total

    def sample(self, i: int):
        a, b = self.sample_offsets[i], self.sample_offsets[i + 1]
        c, d = self.image_offsets[i], self.image_offsets[i + 1]
        return (np.array(self.input_ids[a:b]), np.array(self.labels[a:b]), self.images[c:d],
                np.array(self.image_grid_thw[c:d]))

    def sample_videos(self, i: int):
        """(clip paths, video_grid_thw [n, 3]) of sample i."""
        c, d = self.video_offsets[i], self.video_offsets[i + 1]
        return self.videos[c:d], np.array(self.video_grid_thw[c:d])


def get_or_build(path: str, build, is_builder: bool, overwrite: bool, poll_s: float = 2.0,
                 log=print) -> CachedSamples:
    """Return the cache at `path`, building it with `build()` -> (samples, meta) if needed.

    The builder (local rank 0) holds a file lock while building, so two jobs sharing a
    folder never build the same cache twice; other ranks wait for the folder to appear
    (for `overwrite`, for one newer than the moment they arrived: the barrier makes the
    builder start only after every rank has arrived)."""
    started = time.time()
    if overwrite:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
    if is_builder:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if overwrite or not os.path.isdir(path):
                samples, meta = build()
                write_cache(path, samples, meta)
            elif os.path.isdir(path):
                log(f"data: reusing preprocessed cache {path}")
        return CachedSamples(path)
    announced = False
    while True:
        meta_path = os.path.join(path, "meta.json")
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                if not overwrite or json.load(f)["created"] >= started:
                    return CachedSamples(path)
        if not announced:
            log(f"data: waiting for local rank 0 to build {path}")
            announced = True
        time.sleep(poll_s)
