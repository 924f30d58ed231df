"""data.json -> training dataset and data loader (the entry points the training loop uses)."""

from __future__ import annotations

import os

import numpy as np
import torch

from mindspeed_mm.data.cache import CachedSamples, cache_key, get_or_build
from mindspeed_mm.data.collate import PackedCollator, Qwen2VLCollator
from mindspeed_mm.data.config import DataConfig, PackingParam, check_paths
from mindspeed_mm.data.dataset import Qwen2VLDataset
from mindspeed_mm.jsonio import DataFileError, load_json
from mindspeed_mm.data.positions import VisionTokenIds
from mindspeed_mm.data.preprocess import CHUNK_SIZE, PreprocessSettings, preprocess_records
from mindspeed_mm.data.packing import PackedBatchSampler
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
        attr=config.dataset_param.attr, media_dir=bp.dataset_dir, video=pp.video_settings())


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


def length_filter(cache: CachedSamples, max_seq_length: int | None, max_pack_tokens: int | None = None):
    """(indices of the samples that fit or None for all, {reason: count}, drop lines): samples longer than
    the training --seq-length (longer_than_seq_length), then than a pack (longer_than_pack), are dropped
    here, on the cached lengths, so the cache key (and the cache) stay the same for any bound."""
    lengths = cache.lengths()
    keep = np.ones(len(lengths), dtype=bool)
    counts, lines = {}, []
    for limit, reason, name in ((max_seq_length, "longer_than_seq_length", "--seq-length"),
                                (max_pack_tokens, "longer_than_pack", "packing max_tokens")):
        too_long = keep & (lengths > limit) if limit is not None else None
        if too_long is not None and too_long.any():
            counts[reason] = int(too_long.sum())
            lines.append(f"dropped {counts[reason]} ({reason}), e.g. a sample of {int(lengths[too_long].max())} "
                         f"tokens > {name} {limit}")
            keep &= ~too_long
    return (np.flatnonzero(keep) if counts else None), counts, lines


def summary_lines(cache: CachedSamples, extra_drops: int = 0, extra_lines=()) -> list[str]:
    meta = cache.meta
    total = meta["num_samples"] + sum(meta["drop_counts"].values())
    dropped = total - meta["num_samples"] + extra_drops
    head = f"data: {total - dropped} usable samples of {total}, dropped {dropped}"
    return [head] + [f"data:   {line}" for line in [*meta["drop_lines"], *extra_lines]]


def build_train_valid_datasets(config: DataConfig, local_rank: int | None = None, progress: bool = True,
                               log=print, max_seq_length: int | None = None, max_pack_tokens: int | None = None):
    """Preprocess (or reuse the cache) and return (train_dataset, None): the guide has no
    validation split. Prints the usable/dropped summary; raises NoUsableSamplesError when
    nothing is left. With several ranks per node only local rank 0 builds the cache.
    `max_seq_length` (training's --seq-length) and `max_pack_tokens` (the packing capacity) drop
    longer samples, counted as longer_than_seq_length / longer_than_pack, after the cache (so they do
    not change the cache key)."""
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
    keep, long_counts, long_lines = length_filter(cache, max_seq_length, max_pack_tokens)
    n_long = sum(long_counts.values())
    for line in summary_lines(cache, n_long, long_lines):
        log(line)
    if len(cache) - n_long == 0:
        counts = {**cache.meta["drop_counts"], **long_counts}
        raise NoUsableSamplesError(f"no usable training sample in {', '.join(files)}: every sample was "
                                   f"dropped ({counts}); see the reasons above")
    tokenizer, image_processor = processors
    ids = VisionTokenIds.from_processors(tokenizer, image_processor, settings.model_name_or_path)
    return Qwen2VLDataset(cache, image_processor, ids, tokenizer.pad_token_id, indices=keep,
                          video_settings=settings.video), None


def packing_line(sampler: PackedBatchSampler) -> str:
    """The log's packing summary, from the first epoch's plan."""
    plan, steps = sampler.plan(0), sampler.global_batches(0)
    per_step = sum(b.samples for b in steps) / max(len(steps), 1)
    return (f"data: packing {plan.samples} samples into {len(plan.packs)} packs of at most {plan.max_tokens} tokens: "
            f"efficiency {100 * plan.efficiency:.1f}% (padding {100 * (1 - plan.efficiency):.1f}%), "
            f"{sampler.packs_per_step} packs (~{per_step:.1f} samples) per global batch, {len(steps)} global "
            f"batches per epoch")


def build_dataloader(dataset: Qwen2VLDataset, config: DataConfig, consumed_samples: int = 0,
                     seed: int = 1234, dp_rank: int = 0, dp_size: int = 1,
                     pad_to_multiple_of: int | None = None, pin_memory: bool | None = None,
                     min_length: int = 0, log=print, packing: PackingParam | None = None, micro_batches: int = 1,
                     worker_cores: int | None = None):
    """An endless DataLoader of collated micro-batches for this data-parallel rank, resuming
    after `consumed_samples` global samples. `pad_to_multiple_of` (e.g. the tensor-parallel
    size under sequence parallelism) overrides collate_param.pad_to_multiple_of; batches are
    padded to at least `min_length` tokens. Starts no more loader workers than micro-batches
    per epoch or `worker_cores` (default: the usable cores; data.workers.spare_cores for a training
    process; 0: the samples are loaded in the training process).

    With `packing`, a micro-batch is one row of `batch_size` packs (PackedBatchSampler, PackedCollator)
    and a global batch `batch_size` x `micro_batches` x `dp_size` packs."""
    dl = config.dataloader_param
    multiple = pad_to_multiple_of or dl.collate_param.pad_to_multiple_of
    if packing is None:
        sampler = ResumableBatchSampler(len(dataset), dl.batch_size, dp_rank, dp_size, consumed_samples,
                                        dl.shuffle, seed, dl.drop_last)
        collate = Qwen2VLCollator(dataset.pad_token_id, multiple, dl.collate_param.ignore_pad_token_for_loss,
                                  min_length)
    else:
        lengths, patches = dataset.sample_sizes()
        sampler = PackedBatchSampler(lengths, patches, packing.max_tokens, dl.batch_size, micro_batches, dp_rank,
                                     dp_size, consumed_samples, dl.shuffle, seed, packing.window)
        collate = PackedCollator(dataset.pad_token_id, multiple, min_length)
        log(packing_line(sampler))
    if pin_memory is None:
        from mindspeed_mm.platform import current_platform

        pin_memory = dl.pin_memory and not current_platform().is_cpu
    cores = usable_cores() if worker_cores is None else worker_cores
    workers = effective_workers(dl.num_workers, len(sampler), cores)
    if workers != dl.num_workers:
        log(f"data: loader uses {workers} worker process(es) (dataloader_param.num_workers {dl.num_workers}, "
            f"{len(sampler)} micro-batches per epoch, {cores} spare core(s) of {usable_cores()} usable)")
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                       num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=workers > 0)
