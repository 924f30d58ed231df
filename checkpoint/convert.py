"""The two conversions as library functions: HF -> ours (any TP x PP) and ours -> HF.

Both stream: HF -> ours builds one rank file at a time, each tensor read from
the safetensors files when that rank needs it (as byte ranges copied in the
kernel, checkpoint/copy_plan.py, unless a dtype cast needs the values); ours ->
HF writes each safetensors shard from byte ranges of the rank files
(checkpoint/export_plan.py; merged and transformed in memory, one tensor at a
time, only for a cast or what the byte ranges cannot describe).  Neither byte
path imports torch (~2.5 s of a small machine's start-up, half a 2B copy):
dtypes are names (checkpoint/dtypes.py) and the plans run on row ids.  Every
input is checked before anything is written, and the output folder appears
only when complete (checkpoint/staging.py).
"""
from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Sequence

from checkpoint.copy_plan import OpenFiles, copy_threads, rank_specs
from checkpoint.export_plan import plan_export, read_rank_files, supported
from checkpoint.hf_io import (
    HFCheckpoint,
    copy_hf_side_files,
    read_hf_config,
    write_hf_shards,
    write_hf_shards_streamed,
)
from checkpoint.megatron_io import (
    find_layout,
    load_rank,
    rank_file,
    save_rank,
    save_rank_streamed,
    stage_layers_of,
    write_tracker,
)
from checkpoint.dtypes import to_torch
from checkpoint.layout import LAYOUT_FILE, format_layout, iteration_dir, read_layout, write_layout
from checkpoint.staging import check_save_dir, staged_dir, writing
from mindspeed_mm.constants import HF_DTYPE_NAMES, dtype_name
from mindspeed_mm.errors import UserError
from mindspeed_mm.models import load_model_config, spec_of
from mindspeed_mm.models.parallel import stage_layer_counts

if TYPE_CHECKING:
    import torch

# Shards of the HF export: 2 GB, so that even a 2B model is several files, copied side by side (one
# file is written by one thread at a time: two threads in one file contend for it).
DEFAULT_MAX_SHARD_BYTES = 2 * 10 ** 9


@dataclass
class Summary:
    save_dir: str
    parameters: int = 0          # model parameters (elements), each counted once
    tensors: int = 0             # tensors written, over all files
    files: List[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0

    def __str__(self):
        return (f"converted {self.parameters:,} parameters: {self.tensors} tensors in "
                f"{len(self.files)} files ({self.bytes_written / 2 ** 30:.2f} GiB) in {self.seconds:.1f}s "
                f"-> {self.save_dir}")


# ---- HF -> ours -----------------------------------------------------------------------------

def convert_hf_to_mm(load_dir: str, save_dir: str, tensor_parallel_size: int = 1,
                     pipeline_layer_index: Optional[Sequence[int]] = None,
                     pipeline_num_layers: Optional[Sequence[int]] = None, num_layers: Optional[int] = None,
                     params_dtype: Optional[str] = None, overwrite: bool = False,
                     progress: bool = True) -> Summary:
    """Write ``save_dir`` as a Megatron-layout ``release`` checkpoint plus ``model.json``."""
    start = time.time()
    hf = HFCheckpoint(load_dir)
    spec, cfg = hf.spec, hf.cfg
    if num_layers is not None and num_layers != cfg.text.num_layers:
        raise UserError(f"--num-layers {num_layers}: {load_dir}/config.json has {cfg.text.num_layers} LLM layers")
    tp = tensor_parallel_size
    if tp < 1:
        raise UserError(f"--tensor-parallel-size {tp}: must be at least 1")
    cfg.check_parallel(tp)
    stage_layers = stage_layer_counts(cfg.text.num_layers, pipeline_layer_index, pipeline_num_layers)
    spec.mapping.check_hf_keys(hf.keys(), cfg, source=load_dir, shapes=hf.shapes)
    check_save_dir(save_dir, overwrite, [load_dir])
    cfg.dtype = params_dtype or dtype_name(hf.dtypes.get("model.embed_tokens.weight"), cfg.dtype)
    cast = HF_DTYPE_NAMES[params_dtype] if params_dtype else None  # a dtype name

    pp = len(stage_layers)
    names = [spec.stage_names(cfg, stage_layers, p) for p in range(pp)]
    # Byte copies straight from the safetensors files unless a dtype cast needs the tensors in memory.
    streamed = cast is None or set(hf.dtypes.values()) == {cast}
    summary = Summary(save_dir, parameters=sum(math.prod(s) for s in hf.shapes.values()))
    with staged_dir(save_dir) as tmp, _progress(sum(map(len, names)) * tp, progress) as tick, \
            OpenFiles() as files:
        ours = _Tapped(spec.ours_view(hf, cfg), None if streamed else to_torch(cast), tick)

        def write_rank(p: int, t: int) -> int:
            path = rank_file(tmp, "release", t, p, pp)
            specs = rank_specs(spec, hf, cfg, names[p], tp, t, files, tick) if streamed else None
            with writing(path):
                if specs is not None:
                    return save_rank_streamed(path, specs)
                state = spec.shard_state(ours, cfg, tp, t, stage_layers, p)  # one rank's tensors in memory at a time
                return save_rank(path, state)

        ranks = [(p, t) for p in range(pp) for t in range(tp)]
        # Byte copies run in the kernel without the GIL: one rank file per core, as cp cannot.
        workers = copy_threads(len(ranks)) if streamed else 1
        with ThreadPoolExecutor(workers) as pool:
            for (p, t), written in zip(ranks, pool.map(lambda r: write_rank(*r), ranks)):
                summary.bytes_written += written
                summary.tensors += len(names[p])
                summary.files.append(os.path.relpath(rank_file(tmp, "release", t, p, pp), tmp))
        release = iteration_dir(tmp, "release")
        with writing(os.path.join(release, LAYOUT_FILE)):  # read back by training, inference and the export
            write_layout(release, tp, stage_layers, sync=False)  # the staged folder's rename publishes it
        with writing(os.path.join(tmp, "latest_checkpointed_iteration.txt")):
            write_tracker(tmp, "release", sync=False)
        with writing(os.path.join(tmp, "model.json")):
            cfg.save(os.path.join(tmp, "model.json"), sync=False)
        summary.files += [f"release/{LAYOUT_FILE}", "latest_checkpointed_iteration.txt", "model.json"]
    summary.seconds = time.time() - start
    return summary


class _Tapped(Mapping):
    """A lazy state whose tensors are cast (if asked) and counted as they are built."""

    def __init__(self, state: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype], tick: Callable[[], None]):
        self.state, self.dtype, self.tick = state, dtype, tick

    def __getitem__(self, name):
        t = self.state[name]
        self.tick()
        return t.to(self.dtype) if self.dtype is not None else t

    def __iter__(self):
        return iter(self.state)

    def __len__(self):
        return len(self.state)


# ---- ours -> HF -----------------------------------------------------------------------------

def convert_mm_to_hf(load_dir: str, save_dir: str, hf_dir: str, iteration: Optional[int] = None,
                     params_dtype: Optional[str] = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                     overwrite: bool = False, progress: bool = True,
                     adjust: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None) -> Summary:
    """Write ``save_dir`` as an HF folder (hub key layout, sharded safetensors + index) from any
    TP x PP layout of ``load_dir``; config, tokenizer and processor files come from ``hf_dir``.
    ``adjust(hub name, tensor)`` changes tensors on their way out (LoRA merged in: checkpoint/lora_io.py)."""
    start = time.time()
    raw_config, spec, cfg = read_hf_config(hf_dir)
    cfg = _checked_model_config(spec, load_dir, cfg, hf_dir)
    layout = find_layout(load_dir, iteration)
    check_save_dir(save_dir, overwrite, [load_dir, hf_dir])
    paths = {r: layout.rank_file(*r) for r in layout.ranks()}
    cast = HF_DTYPE_NAMES[params_dtype] if params_dtype else None  # a dtype name
    config_source = (os.path.join(load_dir, "model.json") if os.path.isfile(os.path.join(load_dir, "model.json"))
                     else os.path.join(hf_dir, "config.json"))

    def merged(states):
        stage_layers = _recorded_stage_layers(layout, states, cfg, config_source)
        return spec.merged_view(states, cfg, stage_layers, config_source=config_source,
                                rank_name=lambda t, p: layout.rank_file(t, p))

    # Byte copies from the rank files (read without torch) unless a dtype cast or ``adjust`` needs the values.
    rank_files = read_rank_files(paths) if adjust is None else None
    if rank_files is not None and cast is not None and \
            {r.dtype for f in rank_files.values() for r in f.state.values() if hasattr(r, "dtype")} != {cast}:
        rank_files = None
    in_memory = []  # the hub-layout view over torch-loaded rank files, made on first use

    def tensors():
        if not in_memory:
            states = {r: load_rank(p) for r, p in paths.items()}  # memory-mapped
            in_memory.append(spec.hf_view(merged(states), cfg))
        return in_memory[0]

    summary = Summary(save_dir)

    def get(name):
        t = tensors()[name] if adjust is None else adjust(name, tensors()[name])
        summary.parameters += t.numel()
        return t.to(to_torch(cast)) if cast is not None else t

    full = merged({r: f.state for r, f in rank_files.items()}) if rank_files is not None else None
    names = list(spec.hf_view(full, cfg) if full is not None else tensors())
    with staged_dir(save_dir) as tmp, _progress(len(names), progress) as tick:
        pieces = plan_export(spec, cfg, full, rank_files, slow=get) if full is not None else None
        if pieces is not None and supported(pieces):
            summary.parameters = sum(math.prod(p.shape) for p in pieces.values())
            with OpenFiles() as sources:
                files = write_hf_shards_streamed(tmp, names, pieces, max_shard_bytes, sources, on_tensor=tick)
        else:
            summary.parameters = 0
            files = write_hf_shards(tmp, names, get, max_shard_bytes, on_tensor=tick)
        summary.files = files + copy_hf_side_files(hf_dir, tmp)
        if params_dtype:
            with writing(os.path.join(tmp, "config.json")):
                _set_config_dtype(os.path.join(tmp, "config.json"), raw_config, params_dtype)
        summary.tensors = len(names)
        summary.bytes_written = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
    summary.seconds = time.time() - start
    return summary


def _recorded_stage_layers(layout, states, cfg, config_source: str) -> List[int]:
    """LLM layers per stage from the rank files, checked against layout.json (when the checkpoint has one)
    and against the model config's num_layers."""
    found = stage_layers_of(layout, states)
    path = os.path.join(layout.directory, LAYOUT_FILE)
    recorded = read_layout(layout.directory)
    if recorded["pipeline_num_layers"] is not None:
        on_disk = {"tensor_model_parallel_size": layout.tp_size, "pipeline_model_parallel_size": layout.pp_size,
                   "pipeline_num_layers": found}
        if recorded != on_disk:
            raise UserError(f"{path}: records {format_layout(recorded)} but the rank files hold "
                            f"{format_layout(on_disk)}")
    if sum(found) != cfg.text.num_layers:
        raise UserError(f"{layout.directory}: the checkpoint holds {sum(found)} LLM layers {found} but "
                        f"{config_source} asks text.num_layers = {cfg.text.num_layers}")
    return found


def _checked_model_config(spec, load_dir: str, hf_cfg, hf_dir: str):
    """The checkpoint's own model.json when it has one, checked against the HF config it is exported with:
    the same family (its model_type; none is Qwen2-VL), then the same sizes."""
    path = os.path.join(load_dir, "model.json")
    if not os.path.isfile(path):
        return hf_cfg
    cfg = load_model_config(path)
    saved = spec_of(cfg)
    if saved is not spec:
        raise UserError(f"{path} is a {saved.display_name} model but {hf_dir}/config.json is {spec.display_name} "
                        f"(model_type {spec.name!r}): --hf-dir is not this model's HF folder")
    for part in ("vision", "text"):
        ours, theirs = getattr(cfg, part).__dict__, getattr(hf_cfg, part).__dict__
        for key in ours:
            if key != "make_vocab_size_divisible_by" and ours[key] != theirs[key]:
                raise UserError(f"{path}: {part}.{key} = {ours[key]!r} but {hf_dir}/config.json gives "
                                f"{theirs[key]!r}: --hf-dir is not this model's HF folder")
    return cfg


def _set_config_dtype(path: str, raw: dict, params_dtype: str) -> None:
    raw = dict(raw)
    keys = [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]
    for k in keys:
        raw[k] = HF_DTYPE_NAMES[params_dtype]
    with open(path, "w") as f:
        json.dump(raw, f, indent=2, sort_keys=True)
        f.write("\n")


# ---- helpers --------------------------------------------------------------------------------

@contextmanager
def _progress(total: int, enabled: bool):
    """A tqdm bar over tensors (on stderr); yields its tick function."""
    if not enabled:
        yield lambda: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="tensor", dynamic_ncols=True) as bar:
        yield lambda: bar.update(1)
