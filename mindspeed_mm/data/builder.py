"""data.json -> training dataset and data loader (the entry points the training loop uses)."""

from __future__ import annotations

import os

import numpy as np
import torch

from mindspeed_mm.data.cache import CachedSamples, cache_key, get_or_build
from mindspeed_mm.data.collate import Qwen2VLCollator
from mindspeed_mm.data.config import DataConfig, check_paths
from mindspeed_mm.data.dataset import Qwen2VLDataset
from mindspeed_mm.jsonio import DataFileError, load_json
from mindspeed_mm.data.positions import VisionTokenIds
from mindspeed_mm.data.preprocess import CHUNK_SIZE, PreprocessSettings, preprocess_records
from mindspeed_mm.data.sampler import ResumableBatchSampler
from mindspeed_mm.data.workers import effective_workers, usable_cores
from mindspeed_mm.errors import UserError


class NoUsableSamplesError(UserError):
    """Every sample was dropped."""


def settings_from_config(config: DataConfig) -> PreprocessSettings:
    pp, bp = config.dataset_param.preprocess_parameters, config.dataset_param.basic_parameters
    return PreprocessSettings(
        model_name_or_path=pp.model_name_or_path, min_pixels=pp.min_pixels, max_pixels=pp.max_pixels,
        cutoff_len=bp.cutoff_len, train_on_prompt=bp.train_on_prompt, mask_history=bp.mask_history,
        attr=config.dataset_param.attr, media_dir=bp.dataset_dir)


def dataset_files(config: DataConfig) -> list[str]:
    """`dataset` entries as given if they exist (the guide writes './data/x.json'), else
    under `dataset_dir`."""
    return config.dataset_param.basic_parameters.resolved_dataset_files()


def read_records(files: list[str], max_samples: int | None) -> list[tuple[str, object]]:
    """(where, record) pairs, `where` = 'file[index] id=...' for drop reports."""
    items = []
    for path in files:
        records = load_json(path)
        if not isinstance(records, list):
            raise DataFileError(f"{path}: top level must be a JSON list of records")
        for i, rec in enumerate(records[:max_samples]):
            rid = rec.get("id") if isinstance(rec, dict) else None
            items.append((f"{path}[{i}]" + (f" id={rid}" if rid is not None else ""), rec))
    if not items:  # not "every sample was dropped": there was none to drop
        raise DataFileError(f"{', '.join(files)}: the dataset file has no samples (an empty JSON list)")
    return items


def seq_length_filter(cache: CachedSamples, max_seq_length: int | None):
    """(indices of the samples that fit, drop line or None): samples longer than the
    training --seq-length are dropped here, on the cached lengths, so the cache key (and
    the cache) stay the same for any --seq-length."""
    lengths = cache.lengths()
    if max_seq_length is None:
        return None, None
    keep = np.flatnonzero(lengths <= max_seq_length)
    n = len(lengths) - len(keep)
    if not n:
        return None, None
    longest = int(lengths.max())
    return keep, (f"dropped {n} (longer_than_seq_length), e.g. a sample of {longest} tokens > "
                  f"--seq-length {max_seq_length}")


def summary_lines(cache: CachedSamples, extra_drops: int = 0, extra_lines=()) -> list[str]:
    meta = cache.meta
    total = meta["num_samples"] + sum(meta["drop_counts"].values())
    dropped = total - meta["num_samples"] + extra_drops
    head = f"data: {total - dropped} usable samples of {total}, dropped {dropped}"
    return [head] + [f"data:   {line}" for line in [*meta["drop_lines"], *extra_lines]]


def build_train_valid_datasets(config: DataConfig, local_rank: int | None = None, progress: bool = True,
                               log=print, max_seq_length: int | None = None):
    """Preprocess (or reuse the cache) and return (train_dataset, None): the guide has no
    validation split. Prints the usable/dropped summary; raises NoUsableSamplesError when
    nothing is left. With several ranks per node only local rank 0 builds the cache.
    `max_seq_length` (training's --seq-length) drops longer samples, counted as
    longer_than_seq_length, after the cache (so it does not change the cache key)."""
    bp = config.dataset_param.basic_parameters
    settings = settings_from_config(config)
    files = check_paths(config)
    path = os.path.join(bp.cache_dir, f"qwen2vl-{cache_key(files, settings, bp.max_samples)}")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    processors = settings.load_processors()

    def build():
        items = read_records(files, bp.max_samples)
        workers = effective_workers(bp.preprocessing_num_workers, -(-len(items) // CHUNK_SIZE))
        log(f"data: preprocessing {len(items)} samples with {workers} worker process(es) "
            f"(preprocessing_num_workers {bp.preprocessing_num_workers}, {usable_cores()} usable cores)")
        samples, report = preprocess_records(items, settings, workers, progress=progress)
        return samples, {"drop_counts": dict(report.counts), "drop_lines": report.lines(), "files": files}

    cache = get_or_build(path, build, is_builder=local_rank == 0, overwrite=bp.overwrite_cache, log=log)
    keep, seq_line = seq_length_filter(cache, max_seq_length)
    n_long = 0 if keep is None else len(cache) - len(keep)
    for line in summary_lines(cache, n_long, [seq_line] if seq_line else []):
        log(line)
    if len(cache) - n_long == 0:
        counts = {**cache.meta["drop_counts"], **({"longer_than_seq_length": n_long} if n_long else {})}
        raise NoUsableSamplesError(f"no usable training sample in {', '.join(files)}: every sample was "
                                   f"dropped ({counts}); see the reasons above")
    tokenizer, image_processor = processors
    ids = VisionTokenIds.from_processors(tokenizer, image_processor)
    return Qwen2VLDataset(cache, image_processor, ids, tokenizer.pad_token_id, indices=keep), None


def build_dataloader(dataset: Qwen2VLDataset, config: DataConfig, consumed_samples: int = 0,
                     seed: int = 1234, dp_rank: int = 0, dp_size: int = 1,
                     pad_to_multiple_of: int | None = None, pin_memory: bool | None = None,
                     min_length: int = 0, log=print):
    """An endless DataLoader of collated micro-batches for this data-parallel rank, resuming
    after `consumed_samples` global samples. `pad_to_multiple_of` (e.g. the tensor-parallel
    size under sequence parallelism) overrides collate_param.pad_to_multiple_of; batches are
    padded to at least `min_length` tokens. Starts no more loader workers than micro-batches
    per epoch or usable cores."""
    dl = config.dataloader_param
    sampler = ResumableBatchSampler(len(dataset), dl.batch_size, dp_rank, dp_size, consumed_samples,
                                    dl.shuffle, seed, dl.drop_last)
    collate = Qwen2VLCollator(dataset.pad_token_id, pad_to_multiple_of or dl.collate_param.pad_to_multiple_of,
                              dl.collate_param.ignore_pad_token_for_loss, min_length)
    if pin_memory is None:
        from mindspeed_mm.platform import current_platform

        pin_memory = dl.pin_memory and not current_platform().is_cpu
    workers = effective_workers(dl.num_workers, len(sampler))
    if workers != dl.num_workers:
        log(f"data: loader uses {workers} worker process(es) (dataloader_param.num_workers {dl.num_workers}, "
            f"{len(sampler)} micro-batches per epoch, {usable_cores()} usable cores)")
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=workers > 0)
