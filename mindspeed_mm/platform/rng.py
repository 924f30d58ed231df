"""Every random stream a training step draws from, captured and restored for exact resume.

Python, NumPy, torch's CPU generator, the accelerator's default generator
(``torch.cuda``; on Ascend ``torch_npu``'s transfer_to_npu routes it to the NPU;
absent on the CPU) and megatron's tensor-parallel RNG tracker.  The dict keys
are the checkpoint format's (``rng_state`` in every rank file).
Import after :func:`mindspeed_mm.platform.setup_platform`.
"""
import random

import numpy as np
import torch
from megatron.core import tensor_parallel


def rng_state() -> dict:
    return {"random": random.getstate(), "np": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
