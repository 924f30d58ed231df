"""Training checkpoints in Megatron's layout, saved atomically, loaded for exact resume.

    SAVE/latest_checkpointed_iteration.txt          "N" (or "release" for a converted checkpoint)
    SAVE/model.json                                 the model config
    SAVE/iter_{N:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt
        {'model', 'optimizer', 'opt_param_scheduler', 'rng_state', 'iteration', 'train_state', 'layout',
         'schedule', 'versions', 'config', ...}  (checkpoint_metadata.py; older ones: 'args')
    SAVE/iter_{N:07d}/mp_rank_.../distrib_optim.pt  parameter state of the distributed optimizer

A save writes everything under ``iter_N.tmp-<id>/``; once every rank has
finished, rank 0 renames it to ``iter_N`` and only then replaces the tracker
file (itself through a temporary name).  A crash or ``kill -9`` at any moment
leaves the tracker pointing at the previous complete checkpoint.
"""
import os
import shutil
import time

import torch
from megatron.core import parallel_state as ps

from checkpoint.layout import (CHECKPOINT_VERSION, MODEL_FILE, OPTIM_FILE, TRACKER, iteration_dir, rank_dir,
                               read_tracker, write_tracker)
from checkpoint.lora_io import read_lora_record, write_lora_record
from checkpoint.staging import disk_full_error
from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import replace_dir
from mindspeed_mm.models import lora
from mindspeed_mm.models.lora import adapter_state
from mindspeed_mm.platform.rng import rng_state, set_rng_state
from mindspeed_mm.training.adapters import base_of
from mindspeed_mm.training.checkpoint_metadata import checkpoint_metadata, saved_stage_layers
from mindspeed_mm.training.config import TrainingConfig
from mindspeed_mm.training.preflight import check_resume, write_train_state
from mindspeed_mm.training.state import TrainState


# ---- save -------------------------------------------------------------------
def save_checkpoint(save_dir: str, model, optimizer, scheduler, state: TrainState, model_cfg,
                    config: TrainingConfig) -> str:
    """Collective: every rank calls it.  Returns the final iteration directory."""
    iteration, c = state.iteration, config.checkpoints
    rank = torch.distributed.get_rank()
    final = iteration_dir(save_dir, iteration)
    # One temporary name for all ranks: rank 0 picks it and broadcasts it.
    token = [f"{final}.tmp-{int(time.time() * 1e6)}" if rank == 0 else None]
    torch.distributed.broadcast_object_list(token, src=0)
    tmp = token[0]
    if rank == 0:
        os.makedirs(tmp, exist_ok=True)
    torch.distributed.barrier()

    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    out_dir = rank_dir(tmp, tp_rank, pp_rank, ps.get_pipeline_model_parallel_world_size())
    dp_group = ps.get_data_parallel_group()
    # Every data-parallel rank keeps its own RNG stream: gather them all.
    rngs = [None] * torch.distributed.get_world_size(dp_group)
    if not c.no_save_rng:
        torch.distributed.all_gather_object(rngs, rng_state(), group=dp_group)
    save_optim = not c.no_save_optim and optimizer is not None
    # A stage with nothing to train (LoRA on the LLM, a first stage of ViT + embedding only) has an
    # empty optimizer, which megatron's distributed optimizer cannot save: it is recorded as None.
    trains = _stage_trains(model)
    if save_optim and trains:
        _ensure_optimizer_state(optimizer)
    failure = None
    try:
        if save_optim and trains and config.parallel.use_distributed_optimizer:
            os.makedirs(out_dir, exist_ok=True)
            optimizer.save_parameter_state(os.path.join(out_dir, OPTIM_FILE))  # collective over DP
        if ps.get_data_parallel_rank() == 0:
            os.makedirs(out_dir, exist_ok=True)
            saved = {
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": iteration,
                # A LoRA run saves what it trains: the adapters (its base is named in lora.json).
                "model": adapter_state(unwrap(model)) if config.lora.enabled else unwrap(model).state_dict(),
                "train_state": state.saved(),
                **checkpoint_metadata(config, scheduler),
            }
            if save_optim:
                saved["optimizer"] = optimizer.state_dict() if trains else None
                saved["opt_param_scheduler"] = scheduler.state_dict()
            if not c.no_save_rng:
                saved["rng_state"] = rngs
            torch.save(saved, os.path.join(out_dir, MODEL_FILE))
        if rank == 0:
            write_train_state(tmp, iteration, scheduler if save_optim else None, config)
    except OSError as exc:  # a full disk or quota: every rank learns of it, nothing is published
        failure = f"{exc.filename or tmp}: {exc.strerror or exc}"
    except RuntimeError as exc:  # torch.save hides the errno: the converter's classifier knows its text
        full = disk_full_error(exc, out_dir)
        if full is None:
            raise
        failure = str(full)
    failures = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(failures, failure)
    failed = [f for f in failures if f]
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = read_tracker(save_dir)
        raise UserError(f"--save {save_dir}: checkpoint of iteration {iteration} not saved ({failed[0]}); "
                        + (f"the last complete one, iteration {previous}, is intact" if previous is not None
                           else "no earlier checkpoint exists") + "; free space and resume from it")
    torch.distributed.barrier()
    if rank == 0:
        _publish(save_dir, tmp, final, iteration, model_cfg, base_of(config) if config.lora.enabled else None)
    torch.distributed.barrier()
    return final


def _stage_trains(model) -> bool:
    return any(p.requires_grad for p in model.parameters())


def _ensure_optimizer_state(optimizer) -> None:
    """Adam creates its state at its first step; a save before one (fp16 skips its first ~20 steps
    while the loss scale comes down from 2^32) would find none.  Create it as Adam would: step 0
    and zero moments, so the next step computes exactly what it would have."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
                        inner.state[p].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p.data),
                                              exp_avg_sq=torch.zeros_like(p.data))
                    elif getattr(opt, "init_state_fn", None) is not None:  # fused kernels: their own init
                        opt.init_state_fn(inner, getattr(opt, "config", None))


def _publish(save_dir, tmp, final, iteration, model_cfg, lora_record=None):
    """Rename the finished temporary directory into place, then move the tracker."""
    replace_dir(tmp, final)  # re-saving an iteration (a signal right after a save) replaces it
    model_json = os.path.join(save_dir, "model.json")
    model_cfg.save(model_json)
    if lora_record is not None:
        write_lora_record(save_dir, lora_record)
    write_tracker(save_dir, iteration)


# ---- load -------------------------------------------------------------------
def unwrap(model):
    """The bare model under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def load_checkpoint(load_dir: str, model, optimizer, scheduler, config: TrainingConfig) -> TrainState:
    """Load into the model (and optimizer, scheduler, RNG unless told otherwise).

    Returns the train state to continue from; iteration 0 for a converted ('release')
    checkpoint or with --finetune.
    """
    c = config.checkpoints
    tag = read_tracker(load_dir) if c.ckpt_step is None else c.ckpt_step
    if tag is None:
        raise UserError(f"--load {load_dir}: no {TRACKER} and no release/ directory: not a checkpoint")
    lora_record = read_lora_record(load_dir) if config.lora.enabled else None
    if lora_record is not None:  # a LoRA save: its base first, then (below) its adapters
        base_path, base_state = _read_rank_file(lora_record.base, lora_record.base_iteration)
        _load_model_state(unwrap(model), base_state["model"], base_path, part="base")
        del base_state
    path_file, state = _read_rank_file(load_dir, tag)
    part = None if not config.lora.enabled else "adapters" if lora_record is not None else "base"
    _load_model_state(unwrap(model), state["model"], path_file, part=part)

    # A LoRA run on a full checkpoint starts there: its optimizer and schedule were the full run's.
    weights_only = tag == "release" or c.finetune or part == "base"
    if weights_only:
        return TrainState()
    _check_same_layout(saved_stage_layers(state), config, path_file)
    check_resume(config, state["iteration"], state.get("opt_param_scheduler"), path_file)
    if not c.no_load_optim:
        if "optimizer" not in state:
            raise UserError(f"{path_file}: saved without optimizer state (--no-save-optim); "
                            f"resume with --no-load-optim or use --finetune")
        if state["optimizer"] is not None:  # None: this stage trains nothing (see save_checkpoint)
            with torch.no_grad():  # fp32 main params can be views of the model's leaf parameters
                optimizer.load_state_dict(state["optimizer"])
                if config.parallel.use_distributed_optimizer:
                    _load_parameter_state(optimizer, os.path.join(os.path.dirname(path_file), OPTIM_FILE))
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if not c.no_load_rng:
        if "rng_state" not in state:
            raise UserError(f"{path_file}: saved without RNG state (--no-save-rng); resume with --no-load-rng")
        rngs = state["rng_state"]
        set_rng_state(rngs[ps.get_data_parallel_rank() % len(rngs)])
    return TrainState.from_saved(state["iteration"], state["train_state"])


def _read_rank_file(load_dir: str, tag):
    """(path, contents) of this rank's file of iteration ``tag`` of ``load_dir``."""
    path = rank_dir(iteration_dir(load_dir, tag), ps.get_tensor_model_parallel_rank(),
                    ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size())
    path_file = os.path.join(path, MODEL_FILE)
    if not os.path.isfile(path_file):
        raise UserError(f"--load {load_dir}: {path_file} not found: the checkpoint was written for another "
                        f"tensor/pipeline layout than TP={ps.get_tensor_model_parallel_world_size()} "
                        f"PP={ps.get_pipeline_model_parallel_world_size()} (re-convert or reshard it)")
    try:
        return path_file, torch.load(path_file, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as exc:  # truncated or damaged (a full disk, a killed copy)
        raise UserError(f"--load: {path_file} is unreadable ({str(exc).splitlines()[0]}); load an earlier "
                        f"iteration with --ckpt-step N") from None


def _load_parameter_state(optimizer, filename: str) -> None:
    """The distributed optimizer's parameter state (collective over data-parallel ranks).

    With torch's Adam (no TransformerEngine / apex, e.g. on the CPU) megatron-core 0.16
    keeps a per-parameter 'step' that its saved parameter state lacks, and fails on the
    missing key; 'step' was already restored by load_state_dict, so keep it (unshared).
    """
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner:
        # load_state_dict gave every parameter the *same* 'step' tensor, which torch's Adam
        # then increments once per parameter: give each its own.
        for param_state in opt.optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()

        def set_states(model_param, tensors, opt=opt, original=opt._set_main_param_and_optimizer_states):
            current = opt._get_main_param_and_optimizer_states(model_param)
            original(model_param, {**current, **tensors})

        opt._set_main_param_and_optimizer_states = set_states
    try:
        optimizer.load_parameter_state(filename)
    finally:
        for opt in inner:
            del opt._set_main_param_and_optimizer_states


def _load_model_state(model, saved: dict, source: str, part=None) -> None:
    """``part``: None (every tensor), "base" (all but LoRA adapters) or "adapters" (those only)."""
    own = model.state_dict()
    if part is not None:
        adapter = lambda k: f".{lora.ADAPTER}.lora_" in k  # noqa: E731
        own = {k: v for k, v in own.items() if adapter(k) == (part == "adapters")}
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in saved.items()
             if k in own and torch.is_tensor(v) and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        name, have, want = wrong[0]
        raise UserError(f"{source}: {len(wrong)} tensors have other shapes than this model stage, e.g. {name} "
                        f"{list(have)} in the checkpoint, {list(want)} here: the checkpoint was written for another "
                        f"model (--mm-model) or tensor-parallel size (--tensor-model-parallel-size)")
    missing, unexpected = model.load_state_dict(saved, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and k in own]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        what = (f"missing {len(missing)} tensors (e.g. {missing[0]})" if missing else "") + \
               (" and " if missing and unexpected else "") + \
               (f"has {len(unexpected)} unexpected tensors (e.g. {unexpected[0]})" if unexpected else "")
        raise UserError(f"{source}: does not match this model stage: {what}; check --mm-model and "
                        f"--pipeline-num-layers against the checkpoint")


def _check_same_layout(saved_layers, config: TrainingConfig, source: str) -> None:
    if saved_layers is not None and list(saved_layers) != config.stage_layers:
        raise UserError(f"{source}: saved with LLM layers per pipeline stage {saved_layers}, now "
                        f"{config.stage_layers}; resume with the same --pipeline-num-layers")
