"""Hugging Face Qwen2-VL folders: read tensor by tensor, write sharded safetensors.

The reader never builds the HF model: it reads ``config.json`` and the
safetensors headers (names, shapes, dtypes), then one tensor per request.
Names are given in the hub layout whichever layout the files use.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from safetensors import safe_open

from checkpoint.dtypes import FROM_SAFETENSORS
from checkpoint.staging import writing
from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import atomic_path, load_json, write_json_atomic
from mindspeed_mm.models import spec_for_hf_config
from mindspeed_mm.models.mapping import hub_key
from mindspeed_mm.models.spec import ModelSpec

if TYPE_CHECKING:
    import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".msgpack", ".h5")


def read_hf_config(hf_dir: str) -> Tuple[dict, ModelSpec, object]:
    """(config.json as a dict, the family's spec, our model config); one line if no known family."""
    if not os.path.isdir(hf_dir):
        raise UserError(f"{hf_dir}: HF checkpoint directory not found")
    path = os.path.join(hf_dir, "config.json")
    raw = load_json(path)
    spec = spec_for_hf_config(raw)
    return raw, spec, spec.config_cls.from_hf(raw, source=path)


class HFCheckpoint(Mapping):
    """The tensors of an HF folder (``model.safetensors.index.json`` shards or one
    ``model.safetensors``), keyed by hub-layout name, loaded on access."""

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        self.raw_config, self.spec, self.cfg = read_hf_config(hf_dir)
        self.files = self._weight_files()
        self._where: Dict[str, Tuple[str, str]] = {}  # hub name -> (file, name in the file)
        self._offsets: Dict[str, int] = {}  # hub name -> offset of its bytes in the file
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.dtypes: Dict[str, str] = {}  # dtype names (checkpoint/dtypes.py)
        for file in self.files:
            path = os.path.join(hf_dir, file)
            for name, shape, dtype, offset in _scan_header(path):
                key = hub_key(name)
                if key in self._where:
                    raise UserError(f"{path}: {name} is also in {self._where[key][0]} (as {key})")
                self._where[key] = (path, name)
                self._offsets[key] = offset
                self.shapes[key] = shape
                self.dtypes[key] = dtype

    def _weight_files(self) -> List[str]:
        index = os.path.join(self.dir, INDEX)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{index}: not a safetensors index ({exc.__class__.__name__})") from None
            files = sorted(set(weight_map.values()))
            for file in files:
                if not os.path.isfile(os.path.join(self.dir, file)):
                    raise UserError(f"{index}: shard {file} not found")
            return files
        if os.path.isfile(os.path.join(self.dir, SINGLE)):
            return [SINGLE]
        raise UserError(f"{self.dir}: neither {INDEX} nor {SINGLE} found (only safetensors weights are read)")

    def __getitem__(self, key: str) -> torch.Tensor:
        path, name = self._where[key]
        # Opened per tensor so the file's memory map is dropped at once (keeps the RSS to what we hold).
        with safe_open(path, "pt") as f:
            return f.get_tensor(name)

    def location(self, key: str) -> Tuple[str, int]:
        """(file, byte offset) of a tensor's data, for copying it without loading it."""
        return self._where[key][0], self._offsets[key]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def _scan_header(path: str) -> List[Tuple[str, Tuple[int, ...], str, int]]:
    """(name, shape, dtype name, absolute data offset) of every tensor of a safetensors file, from its header."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        out, data_end = [], 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            data_end = max(data_end, int(end))
            out.append((name, tuple(info["shape"]), FROM_SAFETENSORS.get(info["dtype"], info["dtype"]), 8 + size + begin))
        actual = os.path.getsize(path)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise UserError(f"{path}: cannot read the safetensors header ({exc.__class__.__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if actual < 8 + size + data_end:
        raise UserError(f"{path}: truncated: its header lists {8 + size + data_end:,} bytes, the file has "
                        f"{actual:,} (an interrupted download or copy?)")
    return out


def write_hf_shards(out_dir: str, names: Iterable[str], get: Callable[[str], torch.Tensor],
                    max_shard_bytes: int, on_tensor: Optional[Callable[[], None]] = None) -> List[str]:
    """Write ``get(name)`` for each name into ``model-XXXXX-of-YYYYY.safetensors`` files of at
    most ``max_shard_bytes`` (a bigger tensor gets a shard of its own) plus the index."""
    from safetensors.torch import save_file

    weight_map, files, shard, shard_bytes, total = {}, [], {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            file = f"shard-{len(files) + 1:05d}.tmp"  # named once the shard count is known
            with writing(os.path.join(out_dir, file)), atomic_path(os.path.join(out_dir, file), sync=False) as tmp:
                save_file(shard, tmp, metadata={"format": "pt"})
            files.append((file, list(shard)))
        shard, shard_bytes = {}, 0

    for name in names:
        t = get(name).contiguous()
        size = t.numel() * t.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = t
        shard_bytes += size
        total += size
        if on_tensor:
            on_tensor()
    flush()
    final = []
    for i, (tmp, keys) in enumerate(files, 1):
        name = f"model-{i:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
        weight_map.update({k: name for k in keys})
        final.append(name)
    with writing(os.path.join(out_dir, INDEX)):
        write_json_atomic(os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map},
                          indent=2, sync=False)  # out_dir is a staged folder: its rename publishes it
    return final + [INDEX]


def write_hf_shards_streamed(out_dir: str, names: List[str], pieces: Mapping[str, object], max_shard_bytes: int,
                             sources, on_tensor: Optional[Callable[[], None]] = None) -> List[str]:
    """As :func:`write_hf_shards`, the same shards and bytes, each tensor copied from the rank files by its
    checkpoint/export_plan.py piece instead of built in memory."""
    from checkpoint.copy_plan import copy_threads
    from checkpoint.export_plan import shard_groups, write_safetensors

    groups = shard_groups(names, lambda n: pieces[n].nbytes, max_shard_bytes)
    final = [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
    # One thread per file, files side by side: threads writing into the same file contend for it (measured
    # on ext4: one thread 1.6 GB/s, two 1.1 GB/s); two files at once export a 2B model in half the time.
    workers = copy_threads(len(groups))

    def write(i):
        path = os.path.join(out_dir, final[i])
        with writing(path):
            write_safetensors(path, {n: pieces[n] for n in groups[i]}, sources, on_tensor=on_tensor)

    if len(groups) > 1 and workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(write, range(len(groups))))
    else:
        for i in range(len(groups)):
            write(i)
    weight_map = {n: final[i] for i, group in enumerate(groups) for n in group}
    total = sum(pieces[n].nbytes for n in names)
    with writing(os.path.join(out_dir, INDEX)):
        write_json_atomic(os.path.join(out_dir, INDEX), {"metadata": {"total_size": total}, "weight_map": weight_map},
                          indent=2, sync=False)  # out_dir is a staged folder: its rename publishes it
    return final + [INDEX]


def copy_hf_side_files(hf_dir: str, out_dir: str) -> List[str]:
    """Config, tokenizer, processor, generation and chat-template files: every top-level file but weights.
    Contents only (not the source's permissions): the copies get the umask's mode, as written files do."""
    copied = []
    for name in sorted(os.listdir(hf_dir)):
        src = os.path.join(hf_dir, name)
        if os.path.isfile(src) and not name.endswith(WEIGHT_SUFFIXES) and not name.startswith("."):
            with writing(os.path.join(out_dir, name)):
                shutil.copyfile(src, os.path.join(out_dir, name))
            copied.append(name)
    return copied

