"""Fine-tune Qwen2-VL on megatron-core: the training loop, top to bottom.

    torchrun --nproc_per_node N pretrain_qwen2vl.py --mm-data data.json --mm-model model.json ...

1. flags + model JSON + data JSON, checked before any process group exists;
2. process groups (TP x PP x DP), the model stage of this rank, megatron DDP,
   megatron's optimizer and learning-rate scheduler;
3. a checkpoint: converted weights (start at iteration 0) or a training
   checkpoint (resume everything);
4. the data: this data-parallel rank's shard, resumed after the consumed samples;
5. the loop: one global batch per iteration through megatron-core's pipeline
   schedule, loss = mean over the batch's supervised tokens, NaN/Inf steps
   skipped (10 in a row stop the run), logs, evaluation, checkpoints, and a
   clean stop on SIGTERM/SIGINT.
"""
import dataclasses
import math
import os
import time
from functools import partial

import torch

from mindspeed_mm.constants import torch_dtype
from mindspeed_mm.errors import UserError
from mindspeed_mm.training.arguments import MAX_CONSECUTIVE_NAN, parse_args
from mindspeed_mm.training.flops import BatchShape, train_flops



class LossDiverged(UserError):
    """NaN/Inf losses in MAX_CONSECUTIVE_NAN iterations in a row: a one-line error, exit 2 (nothing saved:
    the weights have not changed since the last finite loss)."""


# ---- 1. configuration ---------------------------------------------------------
def load_configs(args, probe_lock=False):
    """Flags, JSONs, checkpoint and save folder (mindspeed_mm/training/preflight.py)."""
    from mindspeed_mm.training.preflight import check_run

    return check_run(args, int(os.environ.get("WORLD_SIZE", "1")), node_rank=int(os.environ.get("NODE_RANK", "0")),
                     probe_lock=probe_lock)


# ---- 2. model, DDP, optimizer, scheduler -------------------------------------
def build_model(args, model_cfg):
    """This rank's pipeline stage of Qwen2-VL wrapped in megatron DDP."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.enums import ModelType

    from mindspeed_mm.models.qwen2vl.model import Qwen2VLModel

    model_cfg = dataclasses.replace(model_cfg, dtype=args.precision)  # parameters in the training precision
    model = Qwen2VLModel(
        model_cfg, parallel=parallel_settings(args),
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    model.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask for (as Megatron-LM's get_model)
    # Frozen parts (model JSON freeze_*) have requires_grad=False: no gradient buffer,
    # no optimizer state, no share of the grad norm.
    config = model.config
    config.calculate_per_token_loss = True  # gradients divided by the global batch's token count
    config.variable_seq_lengths = args.variable_seq_lengths
    config.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=args.use_distributed_optimizer)
    return DistributedDataParallel(config, ddp_config, model)


def parallel_settings(args):
    from mindspeed_mm.models.parallel import ParallelSettings

    return ParallelSettings(
        tensor_parallel=args.tensor_model_parallel_size, stage_layers=list(args.stage_layers),
        sequence_parallel=args.sequence_parallel, recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers)


def build_optimizer(args, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        params_dtype=torch_dtype(args.precision), loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale, use_distributed_optimizer=args.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [model])
    model.config.grad_scale_func = optimizer.scale_loss  # fp16 loss scaling inside the schedule
    # One scheduler step per iteration (Megatron-LM counts samples; same schedule).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=args.lr_warmup_steps,
        lr_decay_steps=args.lr_decay_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters,
        wd_incr_style="constant", override_opt_param_scheduler=args.override_opt_param_scheduler,
        # Without either flag a differing saved schedule was refused (preflight.check_resume): the saved
        # one equals the flags' then.
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler)
    return optimizer, scheduler


def precision_summary(model, optimizer) -> str:
    """The dtypes mixed precision really uses, read from the objects (not from the flags)."""
    def names(dtypes):
        return "/".join(sorted(str(d).replace("torch.", "") for d in dtypes))

    trained = [p for p in model.parameters() if p.requires_grad]
    main_params = [p for opt in getattr(optimizer, "chained_optimizers", [optimizer])
                   for group in opt.optimizer.param_groups for p in group["params"]]
    return (f"parameters {names({p.dtype for p in trained})}, gradients accumulated and reduced in "
            f"{names({p.main_grad.dtype for p in trained})}, optimizer main parameters "
            f"{names({p.dtype for p in main_params})}")


# ---- 4. data ------------------------------------------------------------------
class Batches:
    """This data-parallel rank's micro-batches, moved to the device and padded as the flags say."""

    def __init__(self, dataset, data_cfg, args, consumed_samples, device, log=print):
        from megatron.core import parallel_state as ps

        from mindspeed_mm.data.builder import build_dataloader

        self.args, self.device = args, device
        dl = dataclasses.replace(data_cfg.dataloader_param, batch_size=args.micro_batch_size)
        data_cfg = dataclasses.replace(data_cfg, dataloader_param=dl)
        multiple = args.tensor_model_parallel_size if args.sequence_parallel else None
        try:
            loader = build_dataloader(dataset, data_cfg, consumed_samples=consumed_samples, seed=args.seed,
                                      dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                                      pad_to_multiple_of=multiple,
                                      min_length=0 if args.variable_seq_lengths else args.seq_length, log=log)
        except ValueError as exc:  # fewer samples than one micro-batch per data-parallel rank
            raise UserError(f"{args.mm_data}: {exc}") from None
        self.iterator = iter(loader)

    def next_global_batch(self):
        """The micro-batches of one iteration (prefetched: their real sizes give the FLOPs)."""
        return [self._prepare(next(self.iterator)) for _ in range(self.args.num_microbatches)]

    def _prepare(self, batch):
        s = batch["input_ids"].shape[1]
        if not self.args.variable_seq_lengths and s > self.args.seq_length:
            raise UserError(f"--seq-length {self.args.seq_length}: a micro-batch of {self.args.mm_data} has {s} "
                            f"tokens; raise --seq-length, lower cutoff_len in the data JSON, or pass "
                            f"--variable-seq-lengths")
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}


def forward_step(data_iterator, model, inject_nan=False):
    """megatron-core's forward step: run the stage; the last stage returns per-token losses."""
    from mindspeed_mm.training.loss import masked_loss_sum, shift_labels

    batch = next(data_iterator)
    labels = shift_labels(batch["labels"])
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None:
        pixel_values = pixel_values.to(model.config.params_dtype)
    output = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=batch["attention_mask"], pixel_values=pixel_values,
                   image_grid_thw=batch.get("image_grid_thw"), labels=labels)
    if inject_nan:  # --inject-nan-loss: as if this stage overflowed; backward then gives NaN gradients too
        output = output * float("nan")
    return output, partial(masked_loss_sum, shifted_labels=labels)


# ---- 5. one iteration -----------------------------------------------------------
def run_global_batch(model, micro_batches, args, forward_only=False, inject_nan=False):
    """Forward (+ backward) over the micro-batches; returns [loss_sum, tokens] of the global
    batch (all data-parallel ranks), the same on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mindspeed_mm.training.loss import reduce_reported_loss

    seq_length = max(b["input_ids"].shape[1] for b in micro_batches)
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, inject_nan=inject_nan), data_iterator=iter(micro_batches),
        model=[model], num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=forward_only)
    device = micro_batches[0]["input_ids"].device
    if ps.is_pipeline_last_stage():
        total = reduce_reported_loss(reports, ps.get_data_parallel_group(), device)
    else:
        total = torch.zeros(2, dtype=torch.float64, device=device)
    # Only the last stage knows the loss: the other stages add zeros.
    torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return total


def train_step(model, optimizer, scheduler, micro_batches, args, state):
    """One optimizer step on one global batch.  Returns (loss, grad_norm)."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    total = run_global_batch(model, micro_batches, args,
                             inject_nan=state["iteration"] + 1 in args.nan_loss_iters)
    loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
    if not math.isfinite(loss):  # its gradients are NaN/Inf too: skip this update (the next one zeroes them)
        state["nan_iters"] += 1
        state["consecutive_nan"] += 1
        return loss, None
    state["consecutive_nan"] = 0
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    else:  # fp16 overflow: the loss scaler already lowered its scale
        state["skipped_iters"] += 1
    return loss, grad_norm


def evaluate(model, valid_batches_factory, args):
    """Mean loss over the supervised tokens of --eval-iters held-out global batches."""
    model.eval()
    batches = valid_batches_factory()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(args.eval_iters_effective):
            total += run_global_batch(model, batches.next_global_batch(), args, forward_only=True).cpu()
    model.train()
    return (float(total[0] / total[1]) if total[1] > 0 else float("nan")), int(total[1])


def global_flops_and_tokens(micro_batches, model_cfg, args, device):
    """Training FLOPs and real tokens of the whole global batch (sum over data-parallel ranks)."""
    from megatron.core import parallel_state as ps

    padded_vocab = model_cfg.text.padded_vocab_size(args.tensor_model_parallel_size)
    shapes = [BatchShape.of(b) for b in micro_batches]
    local = torch.tensor([sum(train_flops(model_cfg, s, padded_vocab) for s in shapes),
                          sum(sum(s.lengths) for s in shapes)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(local, group=ps.get_data_parallel_group())
    return float(local[0]), int(local[1])


# ---- the whole run ----------------------------------------------------------------
def main(argv=None):
    from mindspeed_mm.platform import setup_platform

    args = parse_args(argv)
    if args.preflight:  # the launcher, before torchrun: no device, no processes
        load_configs(args, probe_lock=True)
        print(f"preflight: {args.mm_model}, {args.mm_data}, --load {args.load}, --save {args.save}: ok")
        return None
    from mindspeed_mm.training.orphans import exit_with_parent
    from mindspeed_mm.training.preflight import SaveDirLock

    exit_with_parent()  # a killed torchrun / launcher must not leave this process training
    # Device first: it must be set up before megatron-core is imported.
    platform = setup_platform(args.device)
    model_cfg, data_cfg = load_configs(args)
    lock = SaveDirLock(args.save) if args.save and int(os.environ.get("RANK", "0")) == 0 else None
    from mindspeed_mm.platform.distributed import choose_backend, destroy_distributed, init_distributed

    backend = choose_backend(platform, args.distributed_backend)
    if backend:
        platform = dataclasses.replace(platform, backend=backend)

    init_distributed(platform, args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                     seed=args.seed, timeout_minutes=args.distributed_timeout_minutes)
    try:
        return train(args, model_cfg, data_cfg, platform)
    finally:
        destroy_distributed()
        if lock is not None:
            lock.release()


def train(args, model_cfg, data_cfg, platform):

    from mindspeed_mm.data.builder import build_train_valid_datasets
    from mindspeed_mm.training.checkpointing import load_checkpoint, save_checkpoint
    from mindspeed_mm.training.held_out import split_dataset
    from mindspeed_mm.training.reporting import ProgressReport
    from mindspeed_mm.training.signals import StopRequest

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = platform.device(int(os.environ.get("LOCAL_RANK", "0")))
    report = ProgressReport(args.train_iters, args.log_interval, world, writer_rank=rank == world - 1,
                            tensorboard_dir=args.tensorboard_dir, device_type=platform.device_type)
    report.print(f"training Qwen2-VL on {world} {platform.device_type} process(es): TP={args.tensor_model_parallel_size}"
                 f" PP={args.pipeline_model_parallel_size} DP={args.data_parallel_size}, LLM layers per stage "
                 f"{args.stage_layers}, {args.num_microbatches} micro-batch(es) of {args.micro_batch_size} per "
                 f"iteration, {args.precision}")

    model = build_model(args, model_cfg)
    optimizer, scheduler = build_optimizer(args, model)
    report.print(f"{args.precision}: {precision_summary(model, optimizer)}")
    state = {"iteration": 0, "consumed_samples": 0, "skipped_iters": 0, "nan_iters": 0, "consecutive_nan": 0}
    if args.load:
        loaded = load_checkpoint(args.load, model, optimizer, scheduler, args)
        state.update(loaded)
        if state["iteration"] == 0 or args.no_load_optim:
            optimizer.reload_model_params()  # fp32 main copies from the loaded weights
        report.print(f"loaded {args.load} " + (f"at iteration {state['iteration']}" if state["iteration"]
                                               else "(weights only: starting at iteration 0)"))
    from mindspeed_mm.training.preflight import describe_schedule

    kept = args.use_checkpoint_opt_param_scheduler and state["iteration"] and not args.no_load_optim
    report.print(describe_schedule(scheduler, "the checkpoint" if kept else "these flags"))

    train_ds, valid_ds = split_dataset(
        # --seq-length bounds every sample (longer ones are dropped and counted), variable lengths or not.
        build_train_valid_datasets(data_cfg, log=report.print, max_seq_length=args.seq_length)[0],
        args.split_fractions, args.seed)
    batches = Batches(train_ds, data_cfg, args, state["consumed_samples"], device, log=report.print)
    valid_factory = None
    if valid_ds is not None and args.eval_interval and args.eval_iters:
        args.eval_iters_effective = max(1, min(args.eval_iters, len(valid_ds) // args.global_batch_size))
        valid_factory = lambda: Batches(valid_ds, data_cfg, args, 0, device, log=report.print)  # noqa: E731
    elif args.eval_interval and args.eval_iters:
        report.print("warning: no held-out samples (--split gives validation 0): evaluation is skipped")

    def save(iteration):
        if args.save and iteration > 0:
            path = save_checkpoint(args.save, iteration, model, optimizer, scheduler,
                                   {k: state[k] for k in ("consumed_samples", "skipped_iters", "nan_iters")},
                                   model_cfg, args)
            report.print(f"saved checkpoint {path}")
            return iteration
        return last_saved

    stop = StopRequest()
    last_saved = state["iteration"] if args.load and state["iteration"] else None
    model.train()
    while state["iteration"] < args.train_iters:
        start = time.perf_counter()
        micro_batches = batches.next_global_batch()
        flops, tokens = global_flops_and_tokens(micro_batches, model_cfg, args, device)
        lr = optimizer.param_groups[0]["lr"]  # the rate this iteration's update uses
        loss, grad_norm = train_step(model, optimizer, scheduler, micro_batches, args, state)
        state["iteration"] += 1
        state["consumed_samples"] += args.global_batch_size
        iteration = state["iteration"]
        report.step(iteration, loss=loss, lr=lr, grad_norm=grad_norm,
                    loss_scale=float(optimizer.get_loss_scale()), elapsed=time.perf_counter() - start,
                    flops=flops, tokens=tokens, consumed_samples=state["consumed_samples"],
                    global_batch_size=args.global_batch_size, skipped_iters=state["skipped_iters"],
                    nan_iters=state["nan_iters"])
        if state["consecutive_nan"] >= MAX_CONSECUTIVE_NAN:
            raise LossDiverged(f"the loss was NaN/Inf in {MAX_CONSECUTIVE_NAN} iterations in a row (the last: "
                               f"iteration {iteration}); lower --lr, check the data, or use bf16 instead of fp16; "
                               f"resume from the last checkpoint")

        if valid_factory and iteration % args.eval_interval == 0:
            report.evaluation(iteration, *evaluate(model, valid_factory, args))
        if args.save_interval and iteration % args.save_interval == 0:
            last_saved = save(iteration)
        if stop.agreed(device):
            report.print(f"received {stop.name}: saving iteration {iteration} and exiting")
            if last_saved != iteration:
                last_saved = save(iteration)
            break
        if args.exit_interval and iteration % args.exit_interval == 0:
            report.print(f"--exit-interval {args.exit_interval}: stopping at iteration {iteration}")
            break
    if last_saved != state["iteration"]:
        save(state["iteration"])
    stop.restore()
    report.close()
    return state
