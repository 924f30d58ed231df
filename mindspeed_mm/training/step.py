"""One iteration: forward and backward over a global batch through megatron-core's pipeline
schedule, then the optimizer step; and the forward-only evaluation."""
import math
from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from mindspeed_mm.training.config import TrainingConfig
from mindspeed_mm.training.flops import BatchShape, train_flops
from mindspeed_mm.training.loss import masked_loss_sum, reduce_reported_loss, shift_labels
from mindspeed_mm.training.state import StepResult


def forward_step(data_iterator, model, inject_nan=False):
    """megatron-core's forward step: run the stage; the last stage returns per-token losses."""
    batch = next(data_iterator)
    labels = shift_labels(batch["labels"])
    pixels = {k: batch[k].to(model.config.params_dtype) if batch.get(k) is not None else None
              for k in ("pixel_values", "pixel_values_videos")}
    output = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   attention_mask=batch["attention_mask"], image_grid_thw=batch.get("image_grid_thw"),
                   video_grid_thw=batch.get("video_grid_thw"), labels=labels, cu_seqlens=batch.get("cu_seqlens"),
                   **pixels)
    if inject_nan:  # --inject-nan-loss: as if this stage overflowed; backward then gives NaN gradients too
        output = output * float("nan")
    return output, partial(masked_loss_sum, shifted_labels=labels)


def run_global_batch(model, micro_batches, config: TrainingConfig, forward_only=False, inject_nan=False):
    """Forward (+ backward) over the micro-batches; returns [loss_sum, tokens] of the global
    batch (all data-parallel ranks), the same on every rank."""
    seq_length = max(b["input_ids"].shape[1] for b in micro_batches)
    reports = get_forward_backward_func()(
        forward_step_func=partial(forward_step, inject_nan=inject_nan), data_iterator=iter(micro_batches),
        model=[model], num_microbatches=len(micro_batches), seq_length=seq_length,
        micro_batch_size=micro_batches[0]["input_ids"].shape[0],  # 1 under packing: one row of packs
        forward_only=forward_only)
    device = micro_batches[0]["input_ids"].device
    if ps.is_pipeline_last_stage():
        total = reduce_reported_loss(reports, ps.get_data_parallel_group(), device)
    else:
        total = torch.zeros(2, dtype=torch.float64, device=device)
    # Only the last stage knows the loss: the other stages add zeros.
    torch.distributed.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return total


def _mean(total) -> float:
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def train_step(model, optimizer, scheduler, micro_batches, config: TrainingConfig, iteration: int) -> StepResult:
    """One optimizer step on one global batch; ``iteration`` (1-based) is the one it trains."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    total = run_global_batch(model, micro_batches, config, inject_nan=iteration in config.debug.nan_loss_iters)
    loss = _mean(total)
    if not math.isfinite(loss):  # its gradients are NaN/Inf too: skip this update (the next one zeroes them)
        return StepResult(loss, None, applied=False)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    # else an fp16 overflow: the loss scaler already lowered its scale
    return StepResult(loss, grad_norm, applied=updated)


def evaluate(model, batches, iterations: int, config: TrainingConfig):
    """(mean loss over the supervised tokens, their count) of ``iterations`` held-out global batches."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(iterations):
            total += run_global_batch(model, batches.next_global_batch(), config, forward_only=True).cpu()
    model.train()
    return _mean(total), int(total[1])


def global_flops_and_tokens(micro_batches, model_cfg, config: TrainingConfig, device):
    """Training FLOPs, real tokens and samples of the whole global batch (sum over data-parallel ranks)."""
    padded_vocab = model_cfg.text.padded_vocab_size(config.parallel.tensor_model_parallel_size)
    shapes = [BatchShape.of(b) for b in micro_batches]
    local = torch.tensor([sum(train_flops(model_cfg, s, padded_vocab) for s in shapes),
                          sum(sum(s.lengths) for s in shapes), sum(len(s.lengths) for s in shapes)],
                         dtype=torch.float64, device=device)
    torch.distributed.all_reduce(local, group=ps.get_data_parallel_group())
    return float(local[0]), int(local[1]), int(local[2])
