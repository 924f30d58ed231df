"""The export (ours -> HF) as byte ranges of the rank files, copied in the kernel.

The reverse of checkpoint/copy_plan.py.  A rank file is torch.save's stored
(uncompressed) zip: its central directory and ``data.pkl`` give, for every
tensor, its dtype, shape and the byte offset of its data, read here without
loading a tensor and without torch (:class:`RankFile`).  Every HF tensor is
then made of whole rows of TP pieces: the mapping table's own merge
(``merge_tensor``) and ``to_hf`` transforms are run on row ids
(:class:`~mindspeed_mm.models.mapping.Rows`), and consecutive rows are copied
as one range with ``os.copy_file_range`` at the tensor's offset in the
safetensors file.  Row-parallel pieces (TP > 1: each row is the
concatenation of every rank's row) are read into their column slots.  A
tensor the row ids cannot describe (a non-contiguous record of a
torch.save'd training checkpoint) is built in memory as the in-memory path
builds it, and only that tensor.  The safetensors files are laid out exactly
as ``safetensors.torch.save_file`` lays them out (header order, padding), so
both paths write the same bytes (tests/test_convert_fast_paths.py).
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import zipfile
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from checkpoint.copy_plan import _IOV_MAX, OpenFiles, _buffer, _merge, _preadv_rest, row_ids
from checkpoint.dtypes import FROM_STORAGE, ITEMSIZE, SAFETENSORS, SAFETENSORS_ORDER, name_of
from mindspeed_mm.models.mapping import ROW, Rows
from mindspeed_mm.models.sharding import merge_tensor

if TYPE_CHECKING:
    import torch

_ZEROS = bytes(1 << 22)


# ---- rank files, read without loading tensors ----------------------------------------------

class Record:
    """One tensor of a rank file: dtype name, shape, and where its bytes lie (path, byte offset; offset None
    when they are not one contiguous range)."""
    __slots__ = ("path", "offset", "dtype", "shape", "nbytes")

    def __init__(self, path, offset, dtype, shape):
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, tuple(shape)
        self.nbytes = math.prod(self.shape) * ITEMSIZE[dtype]


class _Storage:
    def __init__(self, key, dtype):
        self.key, self.dtype = key, dtype


class _Rebuilt:
    def __init__(self, storage, storage_offset, size, stride):
        self.storage, self.storage_offset, self.size, self.stride = storage, storage_offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _Rebuilt(storage, storage_offset, size, stride)


def _rebuild_from_type_v2(func, new_type, args, state):  # a tensor subclass: its plain tensor
    return func(*args)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):  # a Parameter: its data
    return data


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


# torch's rebuild functions as they describe a tensor (optimizer states pickle Parameters and subclasses).
_REBUILDERS = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
               ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
               ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter}


class _Unpickler(pickle.Unpickler):
    """data.pkl with tensors as :class:`_Rebuilt` descriptions (storage key, offset, shape, stride)."""

    def find_class(self, module, name):
        if (module, name) in _REBUILDERS:
            return _REBUILDERS[(module, name)]
        if module == "torch" and name in FROM_STORAGE:
            return _StorageType(FROM_STORAGE[name])
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported storage {pid!r}")
        return _Storage(str(pid[2]), pid[1].dtype)


class RankFile:
    """One rank file's ``model`` entry: ``state`` (name -> :class:`Record` for every tensor, other values
    as stored) and ``records`` (the tensors whose bytes are one range: what the plan copies)."""

    def __init__(self, path: str):
        self.path = path
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
        offsets: Dict[str, Tuple[int, int]] = {}
        data = None
        with open(path, "rb") as f:  # entries read at their offsets: our writer, like torch's, leaves CRCs 0
            for info in infos:
                head, _, key = info.filename.rpartition("/")
                is_pkl = key == "data.pkl" and "/" not in head
                if not (is_pkl or head.endswith("/data")) or info.compress_type != zipfile.ZIP_STORED:
                    continue
                f.seek(info.header_offset)
                local = f.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError("bad local header")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                begin = info.header_offset + 30 + name_len + extra_len
                if is_pkl:
                    f.seek(begin)
                    data = f.read(info.file_size)
                else:
                    offsets[key] = (begin, info.file_size)
        if data is None:
            raise ValueError("no data.pkl")
        obj = _Unpickler(io.BytesIO(data)).load()
        if any(k.startswith("model") and k[5:].isdigit() for k in obj):
            raise ValueError("virtual-pipeline checkpoint")  # load_rank names it to the user
        self.state: Dict[str, object] = {}
        self.records: Dict[str, Record] = {}
        for name, t in obj["model"].items():
            if not isinstance(t, _Rebuilt):
                self.state[name] = t
                continue
            itemsize = ITEMSIZE[t.storage.dtype]
            rec = self.state[name] = Record(path, None, t.storage.dtype, t.size)
            want, step = [], 1
            for d in reversed(t.size):
                want.append(step)
                step *= d
            if t.storage.key not in offsets or \
                    any(d != 1 and s != w for d, s, w in zip(t.size, t.stride, reversed(want))):
                continue  # not contiguous: built in memory
            begin, size = offsets[t.storage.key]
            if t.storage_offset * itemsize + rec.nbytes <= size:
                rec.offset = begin + t.storage_offset * itemsize
                self.records[name] = rec


def read_rank_files(paths: Dict[Tuple[int, int], str]) -> Optional[Dict[Tuple[int, int], RankFile]]:
    try:
        return {r: RankFile(p) for r, p in paths.items()}
    except Exception:  # anything unusual in a file: the in-memory path reads it (and names the problem)
        return None


# ---- the plan: what each HF tensor is made of ----------------------------------------------

class Piece:
    """One HF tensor's bytes: ``runs`` (copy_plan Runs, appended in order), ``interleave`` (row-parallel
    pieces joined row by row, then ``rows`` taken), or ``tensor`` (built in memory by the slow path).
    ``dtype`` is a name (a torch dtype is taken as its name)."""

    def __init__(self, dtype, shape, runs=None, interleave=None, rows=None, tensor=None):
        self.dtype, self.shape = name_of(dtype), tuple(shape)
        self.runs, self.interleave, self.rows, self.tensor = runs, interleave, rows, tensor
        self.nbytes = math.prod(self.shape) * ITEMSIZE[self.dtype]


def plan_export(spec, cfg, merged, rank_files: Dict[Tuple[int, int], RankFile],
                slow: Callable[[str], torch.Tensor]) -> Dict[str, Piece]:
    """A :class:`Piece` for every HF tensor (hub name, in ``OursToHF`` order); ``slow(name)`` builds one
    in memory where the row ids cannot describe it."""
    hf_shapes = spec.mapping.hf_shapes(cfg)
    out: Dict[str, Piece] = {}
    for e in spec.entries(cfg):
        if e.ours not in merged.where:
            continue
        pieces = _entry_pieces(spec, cfg, merged, rank_files, e, hf_shapes)
        for h in e.hf:
            out[h] = pieces.get(h) if pieces else None
    for h, piece in out.items():
        if piece is None:
            t = slow(h).contiguous()
            out[h] = Piece(t.dtype, t.shape, tensor=t)
    return out


def _entry_pieces(spec, cfg, merged, rank_files, e, hf_shapes) -> Optional[Dict[str, Piece]]:
    pp, local = merged.where[e.ours]
    tp = merged.tp_size
    recs = [rank_files[(t, pp)].records.get(local) for t in range(tp)]
    if any(r is None for r in recs) or len({r.dtype for r in recs}) != 1 or any(len(r.shape) == 0 for r in recs):
        return None
    dtype = recs[0].dtype
    itemsize = ITEMSIZE[dtype]
    interleaved = spec.mapping.split_kind(local) == ROW and tp > 1
    try:
        if interleaved:  # every row is the rank pieces' rows side by side: follow whole merged rows
            if len({r.shape[0] for r in recs}) != 1 or len({len(r.shape) for r in recs}) != 1:
                return None
            full = Rows.like((recs[0].shape[0], sum(r.shape[1] for r in recs)) + recs[0].shape[2:])
            bases = None
        else:
            bases, ids = row_ids([r.shape for r in recs])
            full = merge_tensor(spec.mapping, local, ids, cfg)
        outs = e.param.transform.to_hf(full, cfg)
    except ValueError:  # a reshape or cut the row ids cannot follow
        return None
    row_bytes = math.prod(full.row) * itemsize
    result = {}
    for h, rows in zip(e.hf, outs):
        if not rows.whole or rows.shape != hf_shapes[h] or math.prod(rows.row) * itemsize != row_bytes:
            return None
        ids = rows.ids.reshape(-1)
        if interleaved:
            identity = bool(np.array_equal(ids, np.arange(1, ids.size + 1)))
            result[h] = Piece(dtype, rows.shape, interleave=recs, rows=None if identity else ids - 1)
        else:
            result[h] = Piece(dtype, rows.shape, runs=_merge(ids, bases, [(r.path, r.offset) for r in recs],
                                                             row_bytes))
    return result


# ---- writing safetensors files -------------------------------------------------------------

def safetensors_header(pieces: Dict[str, Piece], metadata: Optional[dict] = None) -> Tuple[bytes, Dict[str, int]]:
    """The header safetensors' writer produces for these tensors (dtype descending, then name; padded to 8
    bytes with spaces) and each tensor's data offset from the start of the file."""
    order = sorted(pieces, key=lambda n: (-SAFETENSORS_ORDER.index(SAFETENSORS[pieces[n].dtype]), n))
    head, offsets, at = {}, {}, 0
    if metadata is not None:
        head["__metadata__"] = metadata
    for n in order:
        p = pieces[n]
        head[n] = {"dtype": SAFETENSORS[p.dtype], "shape": list(p.shape), "data_offsets": [at, at + p.nbytes]}
        offsets[n] = at
        at += p.nbytes
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {n: start + o for n, o in offsets.items()}


def supported(pieces: Dict[str, Piece]) -> bool:
    return all(p.dtype in SAFETENSORS for p in pieces.values())


def write_safetensors(path: str, pieces: Dict[str, Piece], files: OpenFiles,
                      on_tensor: Optional[Callable[[], None]] = None) -> int:
    """Write one safetensors file from its pieces, each at its offset, in file order."""
    header, offsets = safetensors_header(pieces, {"format": "pt"})
    size = len(header) + sum(p.nbytes for p in pieces.values())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _pwrite_all(fd, header, 0)
        for name in sorted(pieces, key=lambda n: offsets[n]):
            _write_piece(fd, offsets[name], pieces[name], files)
            if on_tensor:
                on_tensor()
        if os.fstat(fd).st_size != size:
            raise RuntimeError(f"{path}: wrote {os.fstat(fd).st_size} bytes, expected {size}")
    finally:
        os.close(fd)
    return size


def _write_piece(fd: int, at: int, p: Piece, files: OpenFiles) -> None:
    if p.tensor is not None:
        import torch  # the tensor was built in memory: torch is loaded

        _pwrite_all(fd, memoryview(p.tensor.reshape(-1).view(torch.uint8).numpy()), at)
    elif p.interleave is not None and p.rows is None:
        # each piece read straight into its column slots of a reused buffer (one scattered preadv per
        # IOV_MAX rows), then one write
        rows = p.interleave[0].shape[0]
        widths = [r.nbytes // rows for r in p.interleave]
        full = sum(widths)
        joined = _buffer("joined", rows * full)
        begin = 0
        for r, width in zip(p.interleave, widths):
            src, offset = files.fd(r.path), r.offset
            for first in range(0, rows, _IOV_MAX):
                iov = [joined[i * full + begin:i * full + begin + width] for i in range(first, min(rows, first + _IOV_MAX))]
                nbytes = len(iov) * width
                got = os.preadv(src, iov, offset)
                if got != nbytes:
                    _preadv_rest(src, iov, offset, got)
                offset += nbytes
            begin += width
        _pwrite_all(fd, joined, at)
    elif p.interleave is not None:
        parts = [np.frombuffer(_pread(files.fd(r.path), r.nbytes, r.offset), np.uint8).reshape(r.shape[0], -1)
                 for r in p.interleave]
        joined = np.concatenate(parts, axis=1)[p.rows]
        _pwrite_all(fd, memoryview(np.ascontiguousarray(joined)).cast("B"), at)
    else:
        for path, offset, count, columns in p.runs:
            assert columns is None
            if path is None:
                while count:
                    n = min(count, len(_ZEROS))
                    _pwrite_all(fd, _ZEROS[:n], at)
                    at, count = at + n, count - n
            else:
                _copy_range_at(files.fd(path), fd, offset, count, at)
                at += count


def _copy_range_at(src: int, dst: int, offset: int, count: int, at: int) -> None:
    """Copy ``count`` bytes of ``src`` from ``offset`` to ``dst`` at ``at`` (in the kernel when it can)."""
    try:
        while count:
            done = os.copy_file_range(src, dst, count, offset, at)
            if done == 0:
                raise EOFError("copy_file_range: source ended early")
            offset, at, count = offset + done, at + done, count - done
    except OSError as exc:
        if exc.errno in _NO_KERNEL_COPY:
            while count:
                chunk = _pread(src, min(count, 1 << 24), offset)
                _pwrite_all(dst, chunk, at)
                offset, at, count = offset + len(chunk), at + len(chunk), count - len(chunk)
        else:
            raise


import errno as _errno  # noqa: E402

_NO_KERNEL_COPY = {_errno.EXDEV, _errno.ENOSYS, _errno.EOPNOTSUPP, _errno.EINVAL, _errno.EBADF}


def _pread(fd: int, count: int, offset: int) -> bytes:
    data = os.pread(fd, count, offset)
    if len(data) != count:
        raise OSError(f"rank file ended {count - len(data)} bytes early")
    return data


def _pwrite_all(fd: int, data, at: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def shard_groups(names: Sequence[str], nbytes: Callable[[str], int], max_shard_bytes: int) -> List[List[str]]:
    """The shards write_hf_shards fills: names in order, a new shard when the next tensor would pass the limit."""
    groups, group, size = [], [], 0
    for n in names:
        b = nbytes(n)
        if group and size + b > max_shard_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(n)
        size += b
    if group:
        groups.append(group)
    return groups
