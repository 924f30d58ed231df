"""Write a ``torch.save``-format file whose tensor bytes are streamed in by the caller.

``torch.save`` needs every tensor in memory and copies it through user space.
This writer lays out the same zip archive torch writes (``data.pkl``, one
64-byte-aligned ``data/N`` record per tensor, the version records; zip64,
stored, CRC 0 as torch writes with ``compute_crc32`` off) and lets a callback
fill each record, e.g. with ``os.copy_file_range`` straight from a
safetensors file.  ``torch.load`` (also with ``mmap=True``) reads it as it
reads torch's own files.  torch itself is not imported: dtypes are names
(checkpoint/dtypes.py) and the two torch globals the pickle refers to are
written by name.
"""
from __future__ import annotations

import collections
import math
import os
import pickle
import struct
from typing import BinaryIO, Callable, Dict, List, Sequence, Tuple

from checkpoint.dtypes import ITEMSIZE, STORAGE, name_of

ALIGNMENT = 64


class TensorSpec:
    """A tensor to be written: dtype (a name or a torch dtype) and shape now, bytes later (``fill(file, nbytes)``)."""

    def __init__(self, dtype, shape: Sequence[int], fill: Callable[[BinaryIO, int], None]):
        self.dtype, self.shape, self.fill = name_of(dtype), tuple(int(d) for d in shape), fill
        self.numel = math.prod(self.shape)
        self.nbytes = self.numel * ITEMSIZE[self.dtype]
        self.key = None  # record name, set when pickled


class _Storage:
    def __init__(self, spec: TensorSpec):
        self.spec = spec


class _Tensor:
    """Pickles exactly as torch pickles a contiguous CPU tensor."""

    def __init__(self, spec: TensorSpec):
        self.storage = _Storage(spec)

    def __reduce_ex__(self, protocol):
        shape = self.storage.spec.shape
        stride, step = [], 1
        for d in reversed(shape):
            stride.append(step)
            step *= d
        return (_global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _Global:
    """A module-level name of torch, pickled as a reference (what pickle writes for torch's own object)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle asks a reduce function to be callable; this one is only written
        raise TypeError(f"{self.module}.{self.name} is a reference for pickling, not the function")


_GLOBALS: Dict[Tuple[str, str], _Global] = {}


def _global(module: str, name: str) -> _Global:
    return _GLOBALS.setdefault((module, name), _Global(module, name))


class _Pickler(pickle._Pickler):
    """The Python pickler (its dispatch table can be extended, the C one's cannot), protocol 2 as torch.save."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, specs: List[TensorSpec]):
        super().__init__(file, protocol=2)
        self.specs = specs

    def _save_global_name(self, obj: _Global) -> None:
        # pickle's own save_global would import the module to check the object is the one it names
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = _save_global_name

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        spec = obj.spec
        spec.key = str(len(self.specs))
        self.specs.append(spec)
        return ("storage", _global("torch", STORAGE[spec.dtype]), spec.key, "cpu", spec.numel)


def write(path: str, obj, tensors: Dict[str, TensorSpec], model_key: str = "model") -> int:
    """Write ``{model_key: tensors, **obj}`` to ``path`` in torch.save format; returns the file size."""
    import io

    specs: List[TensorSpec] = []
    pkl = io.BytesIO()
    _Pickler(pkl, specs).dump({model_key: {name: _Tensor(s) for name, s in tensors.items()}, **obj})
    prefix = os.path.splitext(os.path.basename(path))[0] + "/"
    with open(path, "wb") as f:
        z = _ZipWriter(f)
        z.add_bytes(prefix + "data.pkl", pkl.getvalue())
        z.add_bytes(prefix + ".format_version", b"1")
        z.add_bytes(prefix + ".storage_alignment", str(ALIGNMENT).encode())
        z.add_bytes(prefix + "byteorder", b"little")
        for spec in specs:
            z.add(prefix + "data/" + spec.key, spec.nbytes, spec.fill)
        z.add_bytes(prefix + "version", b"3\n")
        z.add_bytes(prefix + ".data/serialization_id", os.urandom(20).hex().encode())
        z.close()
        return f.tell()


class _ZipWriter:
    """Stored (uncompressed) zip64 entries, data aligned to ALIGNMENT, CRC left 0 (torch does not check it)."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.entries: List[Tuple[bytes, int, int]] = []  # (name, header offset, size)

    def add_bytes(self, name: str, data: bytes) -> None:
        self.add(name, len(data), lambda f, n: f.write(data))

    def add(self, name: str, size: int, fill: Callable[[BinaryIO, int], None]) -> None:
        raw = name.encode()
        offset = self.f.tell()
        zip64 = struct.pack("<HHQQ", 0x0001, 16, size, size)
        data_start = offset + 30 + len(raw) + len(zip64) + 4  # + padding field header
        pad = -data_start % ALIGNMENT
        extra = zip64 + struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding field, as torch writes
        self.f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, 0, 0, 0x21, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                                 len(raw), len(extra)) + raw + extra)
        before = self.f.tell()
        fill(self.f, size)
        if self.f.tell() - before != size:
            raise RuntimeError(f"{name}: wrote {self.f.tell() - before} bytes, expected {size}")
        self.entries.append((raw, offset, size))

    def close(self) -> None:
        cd_start = self.f.tell()
        for raw, offset, size in self.entries:
            extra = struct.pack("<HHQQQ", 0x0001, 24, size, size, offset)
            self.f.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, 0, 0, 0x21, 0, 0xFFFFFFFF,
                                     0xFFFFFFFF, len(raw), len(extra), 0, 0, 0, 0, 0xFFFFFFFF) + raw + extra)
        cd_end = self.f.tell()
        n = len(self.entries)
        self.f.write(struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, cd_end - cd_start, cd_start))
        self.f.write(struct.pack("<IIQI", 0x07064B50, 0, cd_end, 1))
        self.f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
