"""Our checkpoints on disk, in Megatron's layout (paths shared with training's checkpointing).

    SAVE/latest_checkpointed_iteration.txt   "release" (converted) or N (saved by training)
    SAVE/model.json                          the model config (usable as --mm-model)
    SAVE/release|iter_{N:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt   {'model': state_dict, ...}

The ``_{pp:03d}`` suffix is present exactly when PP > 1.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from checkpoint import torch_zip
from checkpoint.torch_zip import TensorSpec
from mindspeed_mm.errors import UserError
from checkpoint.layout import (CHECKPOINT_VERSION, MODEL_FILE, TRACKER, iteration_dir, rank_dir,  # noqa: F401
                               read_tracker, write_tracker)

if TYPE_CHECKING:
    import torch

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def rank_file(root: str, iteration, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(rank_dir(iteration_dir(root, iteration), tp_rank, pp_rank, pp_size), MODEL_FILE)


def save_rank(path: str, model_state: Dict[str, torch.Tensor], iteration=0) -> int:
    """Write one rank's ``{'model': ...}`` file as megatron does (torch.save's format); returns its size.

    Written by checkpoint/torch_zip.py rather than torch.save, so a full disk raises OSError with its
    errno (torch.save reports only 'unexpected pos'), and each tensor's own bytes are written, not the
    whole storage a view points into."""
    return save_rank_streamed(path, {name: _tensor_spec(t) for name, t in model_state.items()}, iteration)


def _tensor_spec(t: torch.Tensor) -> TensorSpec:
    import torch  # the caller holds tensors: torch is loaded

    t = t.detach().contiguous()

    def fill(f, nbytes: int) -> None:
        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return TensorSpec(t.dtype, t.shape, fill)


def save_rank_streamed(path: str, specs: Dict[str, TensorSpec], iteration=0) -> int:
    """As :func:`save_rank`, each tensor's bytes written by its spec (see checkpoint/torch_zip.py)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return torch_zip.write(path, {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}, specs)


@dataclass
class Layout:
    """Where the rank files of one saved iteration are."""
    root: str
    iteration: object  # "release" or an int
    tp_size: int
    pp_size: int

    @property
    def directory(self) -> str:
        return iteration_dir(self.root, self.iteration)

    def rank_file(self, tp_rank: int, pp_rank: int) -> str:
        return rank_file(self.root, self.iteration, tp_rank, pp_rank, self.pp_size)

    def ranks(self) -> List[Tuple[int, int]]:
        return [(tp, pp) for pp in range(self.pp_size) for tp in range(self.tp_size)]


def find_layout(root: str, iteration: Optional[int] = None) -> Layout:
    """The TP x PP grid of the iteration named by ``iteration`` or by the tracker file."""
    if not os.path.isdir(root):
        raise UserError(f"--load-dir {root}: not a directory")
    tag = iteration if iteration is not None else read_tracker(root)
    if tag is None:
        raise UserError(f"--load-dir {root}: no {TRACKER} and no release/ directory: not a Megatron checkpoint")
    directory = iteration_dir(root, tag)
    if not os.path.isdir(directory):
        raise UserError(f"--load-dir {root}: {os.path.basename(directory)}/ not found")
    grid = set()
    for name in os.listdir(directory):
        m = _RANK_DIR.match(name)
        if m and os.path.isfile(os.path.join(directory, name, MODEL_FILE)):
            grid.add((int(m.group(1)), None if m.group(2) is None else int(m.group(2))))
    if not grid:
        raise UserError(f"{directory}: no mp_rank_*/{MODEL_FILE} files")
    with_pp = {pp is not None for _, pp in grid}
    if len(with_pp) > 1:
        raise UserError(f"{directory}: mixes mp_rank_XX and mp_rank_XX_YYY folders")
    tps = sorted({tp for tp, _ in grid})
    pps = sorted({pp or 0 for _, pp in grid})
    if tps != list(range(len(tps))) or pps != list(range(len(pps))) or len(grid) != len(tps) * len(pps):
        raise UserError(f"{directory}: rank folders do not form a full TP x PP grid ({len(grid)} found)")
    return Layout(root, tag, len(tps), len(pps))


def load_rank(path: str, mmap: bool = True) -> Dict[str, torch.Tensor]:
    """The model state of one rank file, memory-mapped so tensors are read only when used.

    Training checkpoints also pickle plain ``args`` values, so this is a full
    (not weights-only) unpickle: load only checkpoints you trust, as with megatron.
    """
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", mmap=mmap, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # a damaged file
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path}: not a megatron checkpoint file (no 'model' entry)")
    if any(k.startswith("model") and k[5:].isdigit() for k in state):
        raise UserError(f"{path}: virtual-pipeline checkpoints (model0, model1, ...) are not supported")
    return state["model"]


def stage_layers_of(layout: Layout, states: Dict[Tuple[int, int], Dict[str, torch.Tensor]]) -> List[int]:
    """LLM layers per pipeline stage, read from the decoder layer indices each stage holds."""
    prefix = "language_model.decoder.layers."
    counts = []
    for pp in range(layout.pp_size):
        layers = {int(k[len(prefix):].split(".", 1)[0]) for k in states[(0, pp)] if k.startswith(prefix)}
        if layers != set(range(len(layers))):
            raise UserError(f"{layout.rank_file(0, pp)}: decoder layer indices {sorted(layers)} are not 0..n-1")
        counts.append(len(layers))
    return counts
