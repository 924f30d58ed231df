"""Values every room shares: the label ignore index, the record placeholders, the dtype names.

No torch at import (the LLaVA converter and the launcher checks start without it).
"""
IGNORE_INDEX = -100  # labels not supervised (prompt, padding); HF's and megatron's cross-entropy default

IMAGE_PLACEHOLDER = "<image>"  # where an image goes in a record's or a --prompt's text
VIDEO_PLACEHOLDER = "<video>"  # where a video clip goes

# Our dtype names (model JSON "dtype", --params-dtype, --bf16/--fp16) and HF config.json's torch_dtype names.
DTYPES = ("bf16", "fp16", "fp32")
HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str):
    """torch dtype of one of :data:`DTYPES`."""
    import torch  # here, not at module level: see the docstring

    return getattr(torch, HF_DTYPE_NAMES[name])


def dtype_name(dtype, default: str = "bf16") -> str:
    """Our name for a torch dtype or an HF dtype string ("bfloat16", "torch.float16"); ``default`` otherwise."""
    text = str(dtype).replace("torch.", "")
    return {hf: ours for ours, hf in HF_DTYPE_NAMES.items()}.get(text, default)
