"""Everything about a training run that can be checked without its processes, checked once.

The launcher runs ``python pretrain_qwen2vl.py --preflight ...`` with the flags torchrun will get,
before torchrun starts: a mistake is one ``error: ...`` line and exit 2, not a failure per rank
after minutes of start-up (or at the first save, after thousands of iterations).  Each training
process runs the same checks again (cheap: JSON files and zip directories), so a direct
``torchrun pretrain_qwen2vl.py`` gets them too.

Checked: the flags, the model and data JSONs, the checkpoint to load (tracker, iteration folder,
its recorded parallel layout against the flags, its model config against --mm-model, every rank
file readable, the saved learning-rate schedule against the flags, --train-iters against the
saved iteration) and the save folder (writable, free space for one checkpoint, not in use by
another run).
"""
import dataclasses
import fcntl
import json
import math
import os
import shutil
import zipfile
from operator import attrgetter

from checkpoint.layout import (MODEL_FILE, TRACKER, format_layout, iteration_dir, rank_dir, read_layout, read_tracker,
                               write_layout)
from mindspeed_mm.data.config import PackingParam, validate_data_json
from mindspeed_mm.errors import UserError
from mindspeed_mm.jsonio import write_text_atomic
from mindspeed_mm.training.adapters import check_lora_load
from mindspeed_mm.models import load_model_config
from mindspeed_mm.training.config import CheckpointConfig, TrainingConfig, validate

LOCK_FILE = ".train.lock"  # in the save folder, held (flock) by rank 0 for the whole run
TRAIN_STATE_FILE = "train_state.json"  # in each saved iteration folder: iteration and schedule

# Scheduler state key -> (flag, the flag's value in the TrainingConfig) compared on resume.
SCHEDULE_KEYS = (("max_lr", "--lr", attrgetter("schedule.lr")), ("min_lr", "--min-lr", attrgetter("schedule.min_lr")),
                 ("lr_warmup_steps", "--lr-warmup-iters/--lr-warmup-fraction", attrgetter("schedule.warmup_steps")),
                 ("lr_decay_steps", "--lr-decay-iters/--train-iters", attrgetter("schedule.decay_iters")),
                 ("lr_decay_style", "--lr-decay-style", attrgetter("schedule.lr_decay_style")),
                 ("start_wd", "--weight-decay", attrgetter("optimization.weight_decay")))
# Model config keys that change tensor shapes (a mismatch means another model).
_SHAPE_KEYS = {"vision": ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "out_hidden_size",
                          "patch_size", "temporal_patch_size", "spatial_merge_size"),
               "text": ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                        "vocab_size", "tie_word_embeddings")}


def check_launch(config: TrainingConfig, probe_lock: bool = False):
    """:func:`check_run` for this process's torchrun environment (WORLD_SIZE, NODE_RANK)."""
    return check_run(config, int(os.environ.get("WORLD_SIZE", "1")), node_rank=int(os.environ.get("NODE_RANK", "0")),
                     probe_lock=probe_lock)


def preflight(config: TrainingConfig) -> None:
    """``pretrain_qwen2vl.py --preflight``: the launcher, before torchrun: no device, no processes."""
    check_launch(config, probe_lock=True)
    c = config.checkpoints
    print(f"preflight: {config.paths.mm_model}, {config.paths.mm_data}, --load {c.load}, --save {c.save}: ok")


def with_packing_flag(data_cfg, max_tokens):
    """data.json's packing with --packing-max-tokens applied (None: as data.json says; 0: off)."""
    if max_tokens is None:
        return data_cfg
    packing = None if max_tokens == 0 else PackingParam(max_tokens, *(
        [data_cfg.packing.window] if data_cfg.packing is not None else []))
    return dataclasses.replace(data_cfg, packing=packing)


def check_run(config: TrainingConfig, world_size: int, node_rank: int = 0, probe_lock: bool = True):
    """All checks.  Returns (the validated config, model_cfg, data_cfg); the config takes the
    pipeline split from the checkpoint when the flags leave it out."""
    model_cfg = load_model_config(config.paths.mm_model)
    data_cfg = validate_data_json(config.paths.mm_data)  # keys, types, dataset files, image folder, tokenizer folder
    data_cfg = with_packing_flag(data_cfg, config.batches.packing_max_tokens)
    checkpoint = _checkpoint_to_load(config.checkpoints) if config.checkpoints.load else None
    if checkpoint is not None:
        config = _take_split_from_checkpoint(config, checkpoint)
    config = validate(config, model_cfg, world_size)
    if checkpoint is not None:
        lora_record = check_lora_load(config)
        # LoRA on a full checkpoint starts at iteration 0 (weights only), whatever iteration it was saved at.
        as_weights = config.lora.enabled and lora_record is None
        check_checkpoint(_weights_only(config) if as_weights else config, model_cfg, checkpoint)
        if lora_record is not None:  # the adapters' base: there, same model, same layout, readable
            tag = lora_record.base_iteration
            base = dataclasses.replace(config.checkpoints, load=lora_record.base,
                                       ckpt_step=None if tag == "release" else int(tag))
            check_checkpoint(_weights_only(dataclasses.replace(config, checkpoints=base)), model_cfg,
                             _checkpoint_to_load(base))
    if config.checkpoints.save:
        # Only the first node: the others see node 0's lock on a shared file system.
        check_save_dir(config, model_cfg, probe_lock=probe_lock and node_rank == 0)
    return config, model_cfg, data_cfg


def _weights_only(config: TrainingConfig) -> TrainingConfig:
    return dataclasses.replace(config, checkpoints=dataclasses.replace(config.checkpoints, finetune=True))


# ---- the checkpoint to load ------------------------------------------------------
def _checkpoint_to_load(c: CheckpointConfig) -> dict:
    if not os.path.isdir(c.load):
        raise UserError(f"--load {c.load}: no such folder (LOAD_PATH: convert the HF model first with "
                        f"examples/qwen2vl/modelconvert.sh, or point it at a training SAVE_PATH)")
    tag = read_tracker(c.load) if c.ckpt_step is None else c.ckpt_step
    if tag is None:
        raise UserError(f"--load {c.load}: no {TRACKER} and no release/ folder: not a checkpoint")
    folder = iteration_dir(c.load, tag)
    if not os.path.isdir(folder):
        saved = [os.path.basename(iteration_dir(c.load, n)) for n in _saved_iterations(c.load)]
        raise UserError(f"--load {c.load}: {os.path.basename(folder)} not found (saved: "
                        f"{', '.join(saved) or 'none'})")
    return {"tag": tag, "dir": folder, "layout": read_layout(folder)}


def _take_split_from_checkpoint(config: TrainingConfig, checkpoint) -> TrainingConfig:
    """No split flag: the checkpoint's recorded split, when it has the asked pipeline size."""
    saved, p = checkpoint["layout"], config.parallel
    if p.pipeline_num_layers is None and p.pipeline_layer_index is None and \
            saved["pipeline_num_layers"] is not None and \
            saved["pipeline_model_parallel_size"] == p.pipeline_model_parallel_size:
        split = ",".join(map(str, saved["pipeline_num_layers"]))
        return dataclasses.replace(config, parallel=dataclasses.replace(p, pipeline_num_layers=split))
    return config


def check_checkpoint(config: TrainingConfig, model_cfg, checkpoint) -> None:
    saved, folder, load = checkpoint["layout"], checkpoint["dir"], config.checkpoints.load
    asked = config.parallel.layout
    same_split = saved["pipeline_num_layers"] is None or saved["pipeline_num_layers"] == asked["pipeline_num_layers"]
    if (saved["tensor_model_parallel_size"], saved["pipeline_model_parallel_size"]) != \
            (asked["tensor_model_parallel_size"], asked["pipeline_model_parallel_size"]) or not same_split:
        raise UserError(f"--load {folder} was written at {format_layout(saved)}, this run asks "
                        f"{format_layout(asked)}: give the checkpoint's layout (TP, PP, --pipeline-num-layers), "
                        f"or convert the model again at the asked one")
    _check_same_model(load, config.paths.mm_model, model_cfg)
    for tp in range(saved["tensor_model_parallel_size"]):
        for pp in range(saved["pipeline_model_parallel_size"]):
            _check_readable(os.path.join(rank_dir(folder, tp, pp, saved["pipeline_model_parallel_size"]), MODEL_FILE),
                            load, checkpoint["tag"])
    if checkpoint["tag"] != "release" and not config.checkpoints.finetune:
        state = _read_train_state(folder)
        if state is not None:
            check_resume(config, state["iteration"], state.get("opt_param_scheduler"), folder)


def _check_same_model(load: str, mm_model: str, model_cfg) -> None:
    path = os.path.join(load, "model.json")
    if not os.path.isfile(path) or os.path.abspath(path) == os.path.abspath(mm_model):
        return
    saved = load_model_config(path)
    diffs = [f"{part}.{key} {getattr(getattr(model_cfg, part), key)} (checkpoint: "
             f"{getattr(getattr(saved, part), key)})"
             for part, keys in _SHAPE_KEYS.items() for key in keys
             if getattr(getattr(model_cfg, part), key) != getattr(getattr(saved, part), key)]
    if diffs:
        raise UserError(f"--mm-model {mm_model} is another model than the checkpoint {load} "
                        f"({path}): {', '.join(diffs)}; use the checkpoint's model.json as MM_MODEL")


def _check_readable(path: str, load: str, tag) -> None:
    """A torch.save file is a zip: a truncated one has no central directory (found without reading it)."""
    problem = None
    if not os.path.isfile(path):
        problem = "missing"
    else:
        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            problem = f"unreadable ({exc}; truncated by a full disk or a killed copy?)"
    if problem:
        hint = ""
        if tag != "release":
            earlier = [n for n in _saved_iterations(load) if n < int(tag)]
            hint = (f"; load the previous checkpoint with --ckpt-step {earlier[-1]} (ITERATION={earlier[-1]} ...)"
                    if earlier else "; no earlier checkpoint is in this folder")
        raise UserError(f"--load: {path} is {problem}{hint}")


def _saved_iterations(root: str):
    """Iterations of the complete iteration folders (not iter_N.tmp-* / .old-*), ascending."""
    return sorted(int(name[5:]) for name in os.listdir(root) if name.startswith("iter_") and name[5:].isdigit())


def _read_train_state(folder: str):
    path = os.path.join(folder, TRAIN_STATE_FILE)
    if not os.path.isfile(path):
        return None  # saved before train_state.json existed: the processes check the schedule
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None


def check_resume(config: TrainingConfig, iteration: int, saved_schedule, source: str) -> None:
    """--train-iters beyond the saved iteration, and the schedule flags against the saved schedule."""
    s = config.schedule
    if iteration >= s.train_iters:
        raise UserError(f"--train-iters {s.train_iters}: the checkpoint {source} is already at iteration "
                        f"{iteration}, so there is nothing to train; to train further raise --train-iters "
                        f"and add --override-opt-param-scheduler (new schedule) or "
                        f"--use-checkpoint-opt-param-scheduler (keep the saved one)")
    if saved_schedule is None or s.override_opt_param_scheduler or s.use_checkpoint_opt_param_scheduler:
        return
    diffs = [f"{flag} gives {_fmt(value(config))}, saved {_fmt(saved_schedule[key])}"
             for key, flag, value in SCHEDULE_KEYS
             if key in saved_schedule and not _same(value(config), saved_schedule[key])]
    if diffs:
        raise UserError(f"the learning-rate schedule differs from the checkpoint's ({source}): {'; '.join(diffs)}; "
                        f"add --override-opt-param-scheduler to follow these flags from iteration {iteration} on, "
                        f"or --use-checkpoint-opt-param-scheduler to keep the saved schedule")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_schedule(scheduler, source: str) -> str:
    """The schedule the run follows, read from the scheduler itself."""
    return (f"learning-rate schedule ({source}): {scheduler.lr_decay_style} from {scheduler.max_lr:g} to "
            f"{scheduler.min_lr:g}, warmup {scheduler.lr_warmup_steps} and decay over {scheduler.lr_decay_steps} "
            f"iterations, at step {scheduler.num_steps}")


# ---- the save folder -----------------------------------------------------------
def check_save_dir(config: TrainingConfig, model_cfg, probe_lock: bool = True) -> None:
    save = config.checkpoints.save
    try:
        os.makedirs(save, exist_ok=True)
        probe = os.path.join(save, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as exc:
        raise UserError(f"--save {save}: not writable ({exc.strerror or exc}); SAVE_PATH must be a folder this "
                        f"user can write") from None
    need = checkpoint_bytes(model_cfg, config)
    free = shutil.disk_usage(save).free
    if free < need:
        raise UserError(f"--save {save}: {free / 1e9:.1f} GB free, but one checkpoint of this model takes about "
                        f"{need / 1e9:.1f} GB; free space or choose another SAVE_PATH")
    if probe_lock:
        with open(os.path.join(save, LOCK_FILE), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f, fcntl.LOCK_UN)
            except BlockingIOError:
                raise UserError(_in_use_message(save)) from None


def _in_use_message(save: str) -> str:
    try:
        holder = open(os.path.join(save, LOCK_FILE)).read().strip()
    except OSError:
        holder = ""
    return (f"--save {save} is in use by another training run{f' ({holder})' if holder else ''}: two runs "
            f"would overwrite each other's checkpoints; choose another SAVE_PATH or stop that run")


class SaveDirLock:
    """Rank 0 holds an flock on SAVE/.train.lock for the run.  The kernel drops it when the process
    ends in any way (kill -9 included), so a killed holder never blocks the next run."""

    def __init__(self, save: str):
        os.makedirs(save, exist_ok=True)
        self.file = open(os.path.join(save, LOCK_FILE), "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise UserError(_in_use_message(save)) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.seek(0)
            self.file.truncate()
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def approx_parameters(cfg) -> int:
    """Parameters of the whole model from its sizes (within a few per cent: biases and norms left out)."""
    v, t = cfg.vision, cfg.text
    vit = v.num_layers * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.ffn_hidden_size) + \
        v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * v.hidden_size
    merged = v.hidden_size * v.spatial_merge_size ** 2
    projector = merged * merged + merged * v.out_hidden_size
    kv = t.kv_channels * t.num_query_groups
    llm = t.num_layers * (t.hidden_size * (t.hidden_size + 2 * kv) + t.hidden_size ** 2 +
                          3 * t.hidden_size * t.ffn_hidden_size)
    embeddings = t.vocab_size * t.hidden_size * (1 if t.tie_word_embeddings else 2)
    return vit + projector + llm + embeddings


def checkpoint_bytes(cfg, config: TrainingConfig) -> int:
    """One saved checkpoint: weights in the training precision, plus fp32 main params and Adam's two
    moments (bf16/fp16) or the two moments (fp32) unless --no-save-optim."""
    precision = config.optimization.precision
    weight = 4 if precision == "fp32" else 2
    optim = 0 if config.checkpoints.no_save_optim else (8 if precision == "fp32" else 12)
    return approx_parameters(cfg) * (weight + optim)


def write_train_state(iter_dir: str, iteration: int, scheduler, config: TrainingConfig) -> None:
    """Beside the rank files: what the launcher's checks need without loading them."""
    write_layout(iter_dir, config.parallel.tensor_model_parallel_size, config.stage_layers)
    state = {"iteration": iteration, "train_iters": config.schedule.train_iters,
             "opt_param_scheduler": scheduler.state_dict() if scheduler is not None else None}
    write_text_atomic(os.path.join(iter_dir, TRAIN_STATE_FILE), json.dumps(state, indent=1) + "\n")

