"""Fine-tune Qwen2-VL on megatron-core: the training loop, top to bottom.

    torchrun --nproc_per_node N pretrain_qwen2vl.py --mm-data data.json --mm-model model.json ...

pretrain_qwen2vl.py parses the flags (config.py) and sets up the platform before this module
imports megatron-core; then :func:`main`:

1. flags + model JSON + data JSON, checked before any process group exists (preflight.py);
2. process groups (TP x PP x DP), the model stage of this rank, megatron DDP,
   megatron's optimizer and learning-rate scheduler (build.py);
3. a checkpoint: converted weights (start at iteration 0) or a training
   checkpoint (resume everything) (checkpointing.py);
4. the data: this data-parallel rank's shard, resumed after the consumed samples (batches.py);
5. the loop (:class:`Trainer`): one global batch per iteration through megatron-core's
   pipeline schedule (step.py), loss = mean over the batch's supervised tokens, NaN/Inf steps
   skipped (10 in a row stop the run), logs, evaluation, checkpoints, and a clean stop on
   SIGTERM/SIGINT.
"""
import os
import time
from typing import Optional

import torch

from mindspeed_mm.data.builder import build_train_valid_datasets
from mindspeed_mm.errors import UserError
from mindspeed_mm.models import spec_of
from mindspeed_mm.platform import setup_platform
from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed, with_backend
from mindspeed_mm.training.adapters import describe as describe_adapters
from mindspeed_mm.training.batches import Batches
from mindspeed_mm.training.build import build_model, build_optimizer, precision_summary
from mindspeed_mm.training.checkpointing import load_checkpoint, save_checkpoint
from mindspeed_mm.training.config import MAX_CONSECUTIVE_NAN, TrainingConfig
from mindspeed_mm.training.held_out import split_dataset
from mindspeed_mm.training.preflight import SaveDirLock, check_launch, describe_schedule
from mindspeed_mm.training.reporting import ProgressReport
from mindspeed_mm.training.signals import StopRequest
from mindspeed_mm.training.state import TrainState
from mindspeed_mm.training.step import evaluate, global_flops_and_tokens, train_step


class LossDiverged(UserError):
    """NaN/Inf losses in MAX_CONSECUTIVE_NAN iterations in a row: a one-line error, exit 2 (nothing saved:
    the weights have not changed since the last finite loss)."""


def main(config: TrainingConfig) -> TrainState:
    """A training process (under torchrun, or alone as a one-rank world)."""
    platform = setup_platform(config.paths.device)  # already set up by pretrain_qwen2vl.py: the same one
    config, model_cfg, data_cfg = check_launch(config)
    save = config.checkpoints.save
    lock = SaveDirLock(save) if save and int(os.environ.get("RANK", "0")) == 0 else None
    platform = with_backend(platform, config.parallel.distributed_backend)
    init_distributed(platform, config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size,
                     seed=config.seed, timeout_minutes=config.parallel.distributed_timeout_minutes)
    try:
        return Trainer(config, model_cfg, data_cfg, platform).run()
    finally:
        destroy_distributed()
        if lock is not None:
            lock.release()


class Trainer:
    """Everything one run needs, built once; :meth:`run` is the loop."""

    def __init__(self, config: TrainingConfig, model_cfg, data_cfg, platform):
        self.config, self.model_cfg, self.data_cfg = config, model_cfg, data_cfg
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.device = platform.device(int(os.environ.get("LOCAL_RANK", "0")))
        self.report = ProgressReport(config.schedule.train_iters, config.logging.log_interval, world,
                                     writer_rank=rank == world - 1, tensorboard_dir=config.logging.tensorboard_dir,
                                     device_type=platform.device_type)
        p = config.parallel
        self.report.print(
            f"training {spec_of(model_cfg).display_name} on {world} {platform.device_type} process(es): TP={p.tensor_model_parallel_size}"
            f" PP={p.pipeline_model_parallel_size} DP={config.data_parallel_size}, LLM layers per stage "
            f"{config.stage_layers}, {config.num_microbatches} micro-batch(es) of {config.batches.micro_batch_size} "
            f"per iteration, {config.optimization.precision}")

        self.model = build_model(config, model_cfg)
        if config.lora.enabled:
            self.report.print(describe_adapters(self.model, config))
        self.optimizer, self.scheduler = build_optimizer(config, self.model)
        self.report.print(f"{config.optimization.precision}: {precision_summary(self.model, self.optimizer)}")
        self.state = self._load()
        self.last_saved = self.state.iteration or None  # the iteration the latest checkpoint holds

        train_ds, self.valid_ds = split_dataset(
            # --seq-length bounds every sample (longer ones are dropped and counted), variable lengths or not.
            build_train_valid_datasets(data_cfg, log=self.report.print, max_seq_length=config.batches.seq_length,
                                       max_pack_tokens=data_cfg.packing and data_cfg.packing.max_tokens)[0],
            config.paths.split_fractions, config.seed)
        self.batches = Batches(train_ds, data_cfg, config, self.state.consumed_samples, self.device,
                               log=self.report.print)
        self.eval_iters = self._eval_iters()

    def _load(self) -> TrainState:
        c = self.config.checkpoints
        state = TrainState()
        if c.load:
            state = load_checkpoint(c.load, self.model, self.optimizer, self.scheduler, self.config)
            if state.iteration == 0 or c.no_load_optim:
                self.optimizer.reload_model_params()  # fp32 main copies from the loaded weights
            self.report.print(f"loaded {c.load} " + (f"at iteration {state.iteration}" if state.iteration
                                                     else "(weights only: starting at iteration 0)"))
        kept = self.config.schedule.use_checkpoint_opt_param_scheduler and state.iteration and not c.no_load_optim
        self.report.print(describe_schedule(self.scheduler, "the checkpoint" if kept else "these flags"))
        return state

    def _eval_iters(self) -> int:
        """Held-out global batches per evaluation; 0 = no evaluation."""
        g = self.config.logging
        if not (g.eval_interval and g.eval_iters):
            return 0
        if self.valid_ds is None:
            self.report.print("warning: no held-out samples (--split gives validation 0): evaluation is skipped")
            return 0
        return max(1, min(g.eval_iters, len(self.valid_ds) // self.config.global_batch_size))

    # ---- the loop ---------------------------------------------------------------
    def run(self) -> TrainState:
        stop = StopRequest()
        try:
            self.model.train()
            while self.state.iteration < self.config.schedule.train_iters:
                self.train_iteration()
                if self.should_evaluate():
                    self.evaluate()
                if self.should_save():
                    self.save()
                reason = self.should_stop(stop)
                if reason:
                    self.report.print(reason)
                    break
            if self.last_saved != self.state.iteration:  # the final (or the signalled) iteration
                self.save()
        finally:
            stop.restore()
            self.report.close()
        return self.state

    def train_iteration(self) -> None:
        start = time.perf_counter()
        micro_batches = self.batches.next_global_batch()
        flops, tokens, samples = global_flops_and_tokens(micro_batches, self.model_cfg, self.config, self.device)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this iteration's update uses
        step = train_step(self.model, self.optimizer, self.scheduler, micro_batches, self.config,
                          self.state.iteration + 1)
        self.state = state = self.state.after(step, samples)  # packs hold a varying number of samples
        self.report.step(state.iteration, loss=step.loss, lr=lr, grad_norm=step.grad_norm,
                         loss_scale=float(self.optimizer.get_loss_scale()), elapsed=time.perf_counter() - start,
                         flops=flops, tokens=tokens, consumed_samples=state.consumed_samples,
                         global_batch_size=self.config.global_batch_size, skipped_iters=state.skipped_iters,
                         nan_iters=state.nan_iters)
        if state.diverged:
            raise LossDiverged(f"the loss was NaN/Inf in {MAX_CONSECUTIVE_NAN} iterations in a row (the last: "
                               f"iteration {state.iteration}); lower --lr, check the data, or use bf16 instead of "
                               f"fp16; resume from the last checkpoint")

    def should_evaluate(self) -> bool:
        return bool(self.eval_iters) and self.state.iteration % self.config.logging.eval_interval == 0

    def evaluate(self) -> None:
        """From the first held-out sample each time, so evaluations compare."""
        batches = Batches(self.valid_ds, self.data_cfg, self.config, 0, self.device, log=self.report.print,
                          packed=False)
        self.report.evaluation(self.state.iteration, *evaluate(self.model, batches, self.eval_iters, self.config))

    def should_save(self) -> bool:
        interval = self.config.checkpoints.save_interval
        return bool(interval) and self.state.iteration % interval == 0

    def save(self) -> None:
        save = self.config.checkpoints.save
        if save and self.state.iteration > 0:
            path = save_checkpoint(save, self.model, self.optimizer, self.scheduler, self.state, self.model_cfg,
                                   self.config)
            self.report.print(f"saved checkpoint {path}")
            self.last_saved = self.state.iteration

    def should_stop(self, stop: StopRequest) -> Optional[str]:
        """Why to stop after this iteration (collective: every rank agrees), or None."""
        iteration, exit_interval = self.state.iteration, self.config.checkpoints.exit_interval
        if stop.agreed(self.device):
            return f"received {stop.name}: saving iteration {iteration} and exiting"
        if exit_interval and iteration % exit_interval == 0:
            return f"--exit-interval {exit_interval}: stopping at iteration {iteration}"
        return None
