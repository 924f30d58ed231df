"""Each rank tensor as byte ranges of the HF safetensors files, copied in the kernel.

Every transform in the mapping table (q/k/v grouping, ViT qkv per head, gate/up,
vocabulary padding) and every TP split except the row-parallel one only moves
whole rows.  Running the table's own transforms and splits on tensors of row
ids (1 + row number over the row's HF inputs; 0 = a padding row of zeros)
therefore yields, for each rank tensor, which source rows it is made of.
Row ids are :class:`~mindspeed_mm.models.mapping.Rows` (numpy), so planning
needs no torch.  Consecutive rows are merged into one range and copied with
``os.copy_file_range`` (as ``cp`` does), so tensor data never passes through
Python; row-parallel pieces (a column range of every row) are read with one
scattered ``preadv`` (the wanted columns into one reused buffer) and written
in one piece.  Only used when no dtype
cast is asked for; otherwise the in-memory path of checkpoint/convert.py runs.
"""
from __future__ import annotations

import math
import os
import threading
from typing import BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from checkpoint.dtypes import ITEMSIZE
from checkpoint.torch_zip import TensorSpec
from mindspeed_mm.host import usable_cores
from mindspeed_mm.models.mapping import ROW, Rows
from mindspeed_mm.models.spec import ModelSpec

# (source file or None for zeros, byte offset, byte count, None or (row bytes, column offset, column bytes)
# when only a column range of every row is taken)
Run = Tuple[Optional[str], int, int, Optional[Tuple[int, int, int]]]
_ZEROS = bytes(1 << 22)


def rank_specs(spec: ModelSpec, hf, cfg, names: Sequence[Tuple[str, str]], tp_size: int, tp_rank: int,
               files: "OpenFiles", tick: Callable[[], None]) -> Optional[Dict[str, TensorSpec]]:
    """TensorSpecs for one rank's (local name, global source) list, or None if a tensor mixes dtypes."""
    by_name = {e.ours: e for e in spec.entries(cfg)}
    specs = {}
    for local, source in names:
        e = by_name[source]
        dtypes = {hf.dtypes[h] for h in e.hf}
        if len(dtypes) != 1:
            return None
        dtype = dtypes.pop()
        rows, runs = _runs(spec, hf, cfg, e, local, tp_size, tp_rank, ITEMSIZE[dtype])
        specs[local] = TensorSpec(dtype, rows.shape, _filler(runs, files, tick))
    return specs


def _runs(spec: ModelSpec, hf, cfg, e, local: str, tp_size: int, tp_rank: int,
          itemsize: int) -> Tuple[Rows, List[Run]]:
    """(this rank's tensor as row ids, its byte ranges)."""
    shapes = [hf.shapes[h] for h in e.hf]
    row_bytes = {math.prod(s[1:]) * itemsize for s in shapes}
    assert len(row_bytes) == 1, f"{e.ours}: HF inputs with different row sizes"
    row_bytes = row_bytes.pop()
    bases, ids = row_ids(shapes)
    full = e.param.transform.to_ours(ids, cfg)
    piece = spec.shard_tensor(local, full, cfg, tp_size, tp_rank)
    locations = [hf.location(h) for h in e.hf]
    if spec.mapping.split_kind(local) != ROW or tp_size == 1:
        return piece, _merge(piece.ids.reshape(-1), bases, locations, row_bytes)
    part = row_bytes // tp_size  # row parallel: this rank's column range of every row
    return piece, [(path, offset, count, (row_bytes, tp_rank * part, part))
                   for path, offset, count, _ in _merge(full.ids.reshape(-1), bases, locations, row_bytes)]


def row_ids(shapes: Sequence[Sequence[int]]) -> Tuple[List[int], List[Rows]]:
    """(bases, row ids) of source tensors numbered one after the other: tensor k's rows are
    bases[k] + 1 .. bases[k] + shape[0] (what :func:`_merge` maps back to files)."""
    bases, ids, total = [], [], 0
    for s in shapes:
        bases.append(total)
        ids.append(Rows.like(s, base=total))
        total += s[0]
    return bases, ids


def _merge(rows: np.ndarray, bases: List[int], locations: List[Tuple[str, int]], row_bytes: int) -> List[Run]:
    """Byte ranges for ``rows`` (1-D row ids), consecutive rows of one source merged into one range."""
    if rows.size == 0:
        return []
    source = np.zeros_like(rows)  # which HF input each row comes from (at most three inputs)
    for base in bases[1:]:
        source += rows - 1 >= base
    zero = rows == 0
    follows = np.zeros_like(zero)  # row i continues the range of row i-1
    follows[1:] = (zero[1:] & zero[:-1]) | (~zero[1:] & ~zero[:-1] & (rows[1:] == rows[:-1] + 1)
                                            & (source[1:] == source[:-1]))
    starts = np.flatnonzero(~follows).tolist()
    runs: List[Run] = []
    for start, end in zip(starts, starts[1:] + [rows.size]):
        row, j = int(rows[start]), int(source[start])
        if row == 0:
            runs.append((None, 0, (end - start) * row_bytes, None))
        else:
            path, offset = locations[j]
            runs.append((path, offset + (row - 1 - bases[j]) * row_bytes, (end - start) * row_bytes, None))
    return runs


def copy_threads(files: int) -> int:
    """Threads copying ``files`` output files side by side: one per file (two threads in one file contend
    for it), at most one per usable core, and at most 4 (each holds a buffer as big as the largest
    row-parallel piece it assembles; beyond a few, the disk is the limit)."""
    return max(1, min(files, usable_cores(), 4))


class OpenFiles:
    """Source files opened once per conversion (read-only file descriptors)."""

    def __init__(self):
        self.fds: Dict[str, int] = {}
        self.lock = threading.Lock()  # rank files may be written by several threads

    def fd(self, path: str) -> int:
        with self.lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
            return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _filler(runs: List[Run], files: OpenFiles, tick: Callable[[], None]) -> Callable[[BinaryIO, int], None]:
    def fill(out: BinaryIO, nbytes: int) -> None:
        out.flush()
        dst = out.fileno()
        for path, offset, count, columns in runs:
            if path is None:
                while count:
                    count -= os.write(dst, _ZEROS[:min(count, len(_ZEROS))])
            elif columns is None:
                _copy_range(files.fd(path), dst, offset, count)
            else:
                _copy_columns(files.fd(path), dst, offset, count, *columns)
        tick()
    return fill


_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_buffers = threading.local()


def _buffer(name: str, size: int) -> memoryview:
    """A per-thread reusable buffer (no fresh pages to fault in for every tensor)."""
    buf = getattr(_buffers, name, None)
    if buf is None or len(buf) < size:
        buf = bytearray(size)
        setattr(_buffers, name, buf)
    return memoryview(buf)[:size]


def _copy_columns(src: int, dst: int, offset: int, count: int, row_bytes: int, begin: int, width: int) -> None:
    """Append the column range [begin, begin + width) of every row of ``src[offset:offset + count]``: one
    scattered read (``preadv``: the wanted columns into one buffer, the rest into a scratch one), one write."""
    rows = count // row_bytes
    want = _buffer("want", rows * width)
    skip = row_bytes - width
    scratch = _buffer("scratch", max(skip, 1))[:skip]
    iov, at = [], offset
    if begin:
        iov.append(scratch[:begin])
    for r in range(rows):
        iov.append(want[r * width:(r + 1) * width])
        tail = skip if r + 1 < rows else row_bytes - begin - width
        if tail:
            iov.append(scratch[:tail])
        if len(iov) >= _IOV_MAX - 2 or r + 1 == rows:
            nbytes = sum(len(v) for v in iov)
            got = os.preadv(src, iov, at)
            if got != nbytes:  # a short read: finish this batch with plain reads
                _preadv_rest(src, iov, at, got)
            at += nbytes
            iov = []
    _write_all(dst, want)


def _preadv_rest(fd: int, iov, at: int, got: int) -> None:
    for v in iov:
        n = len(v)
        if got >= n:
            got -= n
        else:
            v[got:] = _pread(fd, n - got, at + got)
            got = 0
        at += n


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst`` (in the kernel when it can)."""
    try:
        while count:
            done = os.copy_file_range(src, dst, count, offset)
            if done == 0:
                raise OSError("copy_file_range: source ended early")
            offset += done
            count -= done
    except OSError:  # another filesystem or no kernel support: copy through a buffer
        while count:
            chunk = _pread(src, min(count, 1 << 24), offset)
            _write_all(dst, chunk)
            offset += len(chunk)
            count -= len(chunk)


def _pread(fd: int, count: int, offset: int) -> bytes:
    data = os.pread(fd, count, offset)
    if len(data) != count:  # pread of a regular file returns less only at its end
        raise OSError(f"source file ended {count - len(data)} bytes early")
    return data


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]
