"""Megatron's checkpoint layout: names, the tracker file, and atomic publishing.

    SAVE/latest_checkpointed_iteration.txt        'release' or the iteration
    SAVE/release/ or SAVE/iter_{N:07d}/
        mp_rank_{tp:02d}/model_optim_rng.pt       (PP = 1)
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt
        layout.json                               the parallel layout this checkpoint was written at
    SAVE/model.json                               the architecture (Qwen2VLConfig)

Shared by the converter (``checkpoint/``) and training checkpoints
(``mindspeed_mm/training/checkpointing.py``): one definition of the layout.
"""
import json
import os
import re

from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import write_text_atomic

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
LAYOUT_FILE = "layout.json"
CHECKPOINT_VERSION = 3.0
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def iteration_dir(root: str, iteration) -> str:
    return os.path.join(root, "release" if iteration == "release" else f"iter_{int(iteration):07d}")


def rank_dir(iter_dir: str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    name = f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return os.path.join(iter_dir, name)


def read_tracker(root: str):
    """The iteration the tracker names (int), 'release', or None when there is no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return "release" if os.path.isdir(os.path.join(root, "release")) else None
    text = open(path).read().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{path}: expected an iteration number or 'release', got {text!r}") from None


# Small files (tracker, layout.json) are replaced atomically by the project's one writer (jsonio);
# folders (an iteration, a converted checkpoint) are swapped in by jsonio.replace_dir.
# ``sync=False`` inside a staged folder (a conversion's output): its rename publishes it, as cp does not fsync.
def write_tracker(root: str, iteration, sync: bool = True) -> None:
    write_text_atomic(os.path.join(root, TRACKER), f"{iteration}\n", sync)


def write_layout(iter_dir: str, tp: int, stage_layers, sync: bool = True) -> None:
    """Record TP and the LLM layers of each pipeline stage inside an (unpublished) iteration folder."""
    layout = {"tensor_model_parallel_size": int(tp), "pipeline_model_parallel_size": len(stage_layers),
              "pipeline_num_layers": [int(n) for n in stage_layers]}
    write_text_atomic(os.path.join(iter_dir, LAYOUT_FILE), json.dumps(layout) + "\n", sync)


def read_layout(iter_dir: str) -> dict:
    """The layout of a checkpoint folder: ``{"tensor_model_parallel_size", "pipeline_model_parallel_size",
    "pipeline_num_layers"}``.  Folders written before layout.json existed give TP and PP from their rank
    folders and ``pipeline_num_layers`` None."""
    path = os.path.join(iter_dir, LAYOUT_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                layout = json.load(f)
            tp, counts = int(layout["tensor_model_parallel_size"]), [int(n) for n in layout["pipeline_num_layers"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}: unreadable checkpoint layout ({e})") from None
        return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": len(counts),
                "pipeline_num_layers": counts}
    ranks = [m.groups() for m in map(_RANK_DIR.match, os.listdir(iter_dir) if os.path.isdir(iter_dir) else [])
             if m]
    if not ranks:
        raise UserError(f"{iter_dir}: no mp_rank_* folders: not a Megatron checkpoint")
    tp = len({t for t, _ in ranks})
    pp = len({p for _, p in ranks}) if ranks[0][1] is not None else 1
    return {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "pipeline_num_layers": None}


def format_layout(layout: dict) -> str:
    """'TP 2, PP 2 with LLM layers [1, 2]' for messages."""
    text = f"TP {layout['tensor_model_parallel_size']}, PP {layout['pipeline_model_parallel_size']}"
    counts = layout.get("pipeline_num_layers")
    return text + (f" with LLM layers {counts}" if counts is not None else "")
