"""Records -> token ids, labels and image / video grids, in worker processes, dropping bad samples."""

from __future__ import annotations

import multiprocessing as mp
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from mindspeed_mm.data.config import MODEL_KEY, Attr, DataConfigError, check_model_dir
from mindspeed_mm.data.formats import DROP_REASONS, DropSample, parse_record
from mindspeed_mm.data.images import check_images
from mindspeed_mm.constants import IGNORE_INDEX
from mindspeed_mm.data.template import Encoded, Qwen2VLTemplate
from mindspeed_mm.data.video import VideoSettings, probe, video_grid


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes the preprocessed result (and so the cache key)."""
    model_name_or_path: str
    min_pixels: int
    max_pixels: int
    cutoff_len: int
    train_on_prompt: bool
    mask_history: bool
    attr: Attr
    media_dir: str
    video: VideoSettings = VideoSettings()

    def load_processors(self):
        """The tokenizer and image processor of model_name_or_path at these pixel bounds."""
        return load_processors(self.model_name_or_path, self.min_pixels, self.max_pixels)


@dataclass
class Sample:
    input_ids: np.ndarray          # int32 [s]
    labels: np.ndarray             # int32 [s]
    images: list[str]
    image_grid_thw: np.ndarray     # int32 [n_images, 3]
    videos: list[str] = field(default_factory=list)
    video_grid_thw: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int32))  # int32 [n_videos, 3]


@dataclass
class DropReport:
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> "where: detail"

    def add(self, reason: str, where: str, detail: str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, f"{where}: {detail}")

    def lines(self) -> list[str]:
        return [f"dropped {self.counts[r]} ({r}), e.g. {self.examples[r]}"
                for r in DROP_REASONS if self.counts[r]]


def load_processors(model: str, min_pixels=None, max_pixels=None, key: str = MODEL_KEY):
    """The tokenizer and Qwen2VLImageProcessor of an HF folder (training and inference), the processor's
    min/max_pixels overridden when given; a bad folder is one DataConfigError line starting with `key`
    (the data.json key, or a flag such as --tokenizer-path)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    check_model_dir(model, key)
    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        image_processor = Qwen2VLImageProcessor.from_pretrained(model, **pixels)
    except (OSError, ValueError, KeyError) as e:  # HF's errors for unreadable / incomplete folders
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataConfigError(f"{key}: cannot load the tokenizer / image processor from {model!r}: {first}") from None
    return tokenizer, image_processor


def truncate(enc: Encoded, cutoff_len: int, vision_token_ids: np.ndarray, video_token_id: int | None = None) -> Encoded:
    """Keep the first `cutoff_len` tokens if no image or video token is cut and a target remains."""
    if len(enc.input_ids) <= cutoff_len:
        return enc
    tail = enc.input_ids[cutoff_len:]
    if video_token_id is not None and (tail == video_token_id).any():
        videos = int((enc.input_ids == video_token_id).sum())
        raise DropSample("video_too_long", f"{len(enc.input_ids)} tokens ({videos} of them video) > cutoff_len "
                         f"{cutoff_len}; lower video_fps / video_max_frames / video_max_pixels or set "
                         "video_total_pixels (preprocess_parameters)")
    if np.isin(tail, vision_token_ids).any():
        raise DropSample("too_long", f"{len(enc.input_ids)} tokens > cutoff_len {cutoff_len} and the cut "
                         "would split or remove an image")
    kept = Encoded(enc.input_ids[:cutoff_len], enc.labels[:cutoff_len])
    if not (kept.labels != IGNORE_INDEX).any():
        raise DropSample("too_long", f"{len(enc.input_ids)} tokens > cutoff_len {cutoff_len} and no "
                         "supervised token is left")
    return kept


class Preprocessor:
    """One record at a time; built once per worker process."""

    def __init__(self, settings: PreprocessSettings, processors=None):
        self.settings = settings
        tokenizer, self.image_processor = processors or settings.load_processors()
        self.template = Qwen2VLTemplate(tokenizer, settings.train_on_prompt, settings.mask_history)
        self.merge = self.image_processor.merge_size

    def __call__(self, record) -> Sample:
        conv = parse_record(record, self.settings.attr, self.settings.media_dir)
        grids = check_images(conv.images, self.image_processor)
        ip = self.image_processor
        video_grids = [video_grid(probe(path), self.settings.video, ip.patch_size, ip.merge_size,
                                  ip.temporal_patch_size) for path in conv.videos]
        tokens = lambda gs: [t * h * w // self.merge ** 2 for t, h, w in gs]  # noqa: E731
        enc = truncate(self.template.encode(conv, tokens(grids), tokens(video_grids)), self.settings.cutoff_len,
                       self.template.vision_token_ids, self.template.video_token_id)
        as_array = lambda gs: np.asarray(gs, dtype=np.int32).reshape(-1, 3)  # noqa: E731
        return Sample(enc.input_ids, enc.labels, conv.images, as_array(grids), conv.videos, as_array(video_grids))


_worker: Preprocessor | None = None


def _init_worker(settings: PreprocessSettings) -> None:
    global _worker
    _worker = Preprocessor(settings)


def _run_chunk(chunk):
    out = []
    for where, record in chunk:
        try:
            out.append(_worker(record))
        except DropSample as d:
            out.append((where, d.reason, str(d)))
    return out


# Samples per task sent to a worker; also the least work worth a worker process of its own
# (a spawned worker takes seconds to import torch and load the tokenizer).
CHUNK_SIZE = 64


def preprocess_records(items, settings: PreprocessSettings, num_workers: int = 1,
                       progress: bool = True, chunk_size: int = CHUNK_SIZE):
    """`items` is a list of (where, record), where naming the file and index for reports.
    Returns (samples in input order, DropReport). The caller caps num_workers
    (data.workers.effective_workers, one worker per chunk at most)."""
    from tqdm import tqdm

    chunks = [items[i:i + chunk_size] for i in range(0, len(items), chunk_size)]
    bar = tqdm(total=len(items), desc="preprocessing", unit="sample", disable=not progress)
    samples, report = [], DropReport()

    def collect(results):
        for r in results:
            if isinstance(r, Sample):
                samples.append(r)
            else:
                report.add(r[1], r[0], r[2])
        bar.update(len(results))

    if num_workers <= 1:
        _init_worker(settings)
        for chunk in chunks:
            collect(_run_chunk(chunk))
    else:
        # spawn: forked workers would inherit the trainer's threads and accelerator state.
        ctx = mp.get_context("spawn")
        with ctx.Pool(num_workers, initializer=_init_worker, initargs=(settings,)) as pool:
            for results in pool.imap(_run_chunk, chunks):
                collect(results)
    bar.close()
    return samples, report
