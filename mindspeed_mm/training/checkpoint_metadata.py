"""What a training checkpoint says about itself, beside the tensors.

Every rank file (``model_optim_rng.pt``) holds, next to ``model`` / ``optimizer`` /
``opt_param_scheduler`` / ``rng_state``:

    'iteration', 'checkpoint_version'
    'train_state'  {'consumed_samples', 'skipped_iters', 'nan_iters'}: the data position and counters
    'layout'       {'tensor_model_parallel_size', 'pipeline_model_parallel_size', 'pipeline_num_layers'}
    'schedule'     the learning-rate schedule followed (the scheduler's state) and 'train_iters'
    'versions'     {'checkpoint_version', 'mindspeed_mm', 'megatron_core', 'torch'}
    'config'       the TrainingConfig as a plain dict

Checkpoints saved before these entries carry ``'args'`` instead (the flags, as a dict or an
argparse Namespace): :func:`saved_stage_layers` reads either.
"""
import argparse
from importlib import metadata

import torch

from checkpoint.layout import CHECKPOINT_VERSION


def checkpoint_metadata(config, scheduler) -> dict:
    return {
        "layout": config.parallel.layout,
        "schedule": dict(scheduler.state_dict(), train_iters=config.schedule.train_iters),
        "versions": versions(),
        "config": config.to_dict(),
    }


def versions() -> dict:
    return {"checkpoint_version": CHECKPOINT_VERSION, "mindspeed_mm": _installed("mindspeed_mm"),
            "megatron_core": _installed("megatron-core"), "torch": torch.__version__}


def _installed(package: str):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def saved_stage_layers(state: dict):
    """LLM layers per pipeline stage a rank file was saved with (None when it does not say)."""
    if "layout" in state:
        return state["layout"]["pipeline_num_layers"]
    old = state.get("args") or {}  # before 'layout': the flags, with validate()'s derived values
    if isinstance(old, argparse.Namespace):
        old = vars(old)
    return old.get("stage_layers")
