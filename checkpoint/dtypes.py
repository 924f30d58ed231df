"""Tensor dtypes by name, so that the byte-copy conversions never import torch.

A dtype here is torch's own name for it (``"bfloat16"``, as in ``torch.bfloat16``);
the tables give its size and how safetensors headers and torch.save pickles
spell it.  Importing torch costs ~2.5 s on a small machine, more than half of
what copying a 2B checkpoint takes, so the conversions plan and copy with
these names and import torch only when a tensor's values are needed (a dtype
cast, a merged LoRA, a record they cannot describe).
"""
from __future__ import annotations

ITEMSIZE = {"bool": 1, "uint8": 1, "int8": 1, "int16": 2, "float16": 2, "bfloat16": 2, "int32": 4, "float32": 4,
            "float64": 8, "int64": 8}
# safetensors' header names, in the order its writer sorts tensors by (descending), as its Rust Dtype enum.
SAFETENSORS = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "float16": "F16", "bfloat16": "BF16",
               "int32": "I32", "float32": "F32", "float64": "F64", "int64": "I64"}
SAFETENSORS_ORDER = list(SAFETENSORS.values())
FROM_SAFETENSORS = {code: name for name, code in SAFETENSORS.items()}
# torch.save's legacy storage class names (what a rank file's data.pkl refers to).
STORAGE = {"bool": "BoolStorage", "uint8": "ByteStorage", "int8": "CharStorage", "int16": "ShortStorage",
           "float16": "HalfStorage", "bfloat16": "BFloat16Storage", "int32": "IntStorage", "float32": "FloatStorage",
           "float64": "DoubleStorage", "int64": "LongStorage"}
FROM_STORAGE = {storage: name for name, storage in STORAGE.items()}


def name_of(dtype) -> str:
    """The name of a torch dtype (or a name already): torch.bfloat16 -> "bfloat16"."""
    return str(dtype).replace("torch.", "")


def to_torch(name: str):
    import torch  # only where tensors are built

    return getattr(torch, name)
