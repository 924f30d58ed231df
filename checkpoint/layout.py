"""Megatron's checkpoint layout: names, the tracker file, and atomic publishing.

    SAVE/latest_checkpointed_iteration.txt        'release' or the iteration
    SAVE/release/ or SAVE/iter_{N:07d}/
        mp_rank_{tp:02d}/model_optim_rng.pt       (PP = 1)
        mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt
    SAVE/model.json                               the architecture (Qwen2VLConfig)

Shared by the converter (``checkpoint/``) and training checkpoints
(``mindspeed_mm/training/checkpointing.py``): one definition of the layout.
"""
import os
import shutil

from mindspeed_mm.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
OPTIM_FILE = "distrib_optim.pt"
CHECKPOINT_VERSION = 3.0


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


def write_atomically(path: str, text: str) -> None:
    """Replace a small text file so that readers see the old or the new content, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_tracker(root: str, iteration) -> None:
    write_atomically(os.path.join(root, TRACKER), f"{iteration}\n")


def replace_dir(tmp: str, final: str) -> None:
    """Move a finished temporary folder to ``final``, replacing an older one."""
    if os.path.isdir(final):
        old = f"{final}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
