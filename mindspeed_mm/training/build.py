"""This rank's model stage in megatron DDP, megatron's optimizer and learning-rate scheduler."""
import dataclasses

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.enums import ModelType
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from mindspeed_mm.constants import torch_dtype
from mindspeed_mm.models import spec_of
from mindspeed_mm.platform import current_platform
from mindspeed_mm.training.adapters import attach as attach_adapters
from mindspeed_mm.training.config import TrainingConfig


def build_model(config: TrainingConfig, model_cfg):
    """This rank's pipeline stage of the model (its family's spec builds it) wrapped in megatron DDP."""
    model_cfg = dataclasses.replace(model_cfg, dtype=config.optimization.precision)  # parameters in the training precision
    model = spec_of(model_cfg).build_stage(
        model_cfg, config.parallel.model_settings(),
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    model.model_type = ModelType.encoder_or_decoder  # what megatron's schedules ask for (as Megatron-LM's get_model)
    if config.lora.enabled:  # every base weight frozen, adapters trained (before DDP sizes its buffers)
        attach_adapters(model, config, model_cfg, ps.get_tensor_model_parallel_rank())
    # Frozen parts (model JSON freeze_*) have requires_grad=False: no gradient buffer,
    # no optimizer state, no share of the grad norm.
    mcore = model.config
    mcore.calculate_per_token_loss = True  # gradients divided by the global batch's token count
    mcore.variable_seq_lengths = config.batches.variable_seq_lengths
    mcore.finalize_model_grads_func = finalize_model_grads
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=config.parallel.use_distributed_optimizer)
    return DistributedDataParallel(mcore, ddp_config, model)


def build_optimizer(config: TrainingConfig, model):
    o, s = config.optimization, config.schedule
    opt_config = OptimizerConfig(
        optimizer="adam", lr=s.lr, min_lr=s.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=o.precision == "bf16", fp16=o.precision == "fp16",
        params_dtype=torch_dtype(o.precision), loss_scale=o.loss_scale,
        initial_loss_scale=o.initial_loss_scale, use_distributed_optimizer=config.parallel.use_distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [model])
    if current_platform().fused_torch_adam:
        _use_fused_kernel(optimizer)
    model.config.grad_scale_func = optimizer.scale_loss  # fp16 loss scaling inside the schedule
    # One scheduler step per iteration (Megatron-LM counts samples; same schedule).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=s.lr, min_lr=s.min_lr, lr_warmup_steps=s.warmup_steps,
        lr_decay_steps=s.decay_iters, lr_decay_style=s.lr_decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=s.train_iters,
        wd_incr_style="constant", override_opt_param_scheduler=s.override_opt_param_scheduler,
        # Without either flag a differing saved schedule was refused (preflight.check_resume): the saved
        # one equals the flags' then.
        use_checkpoint_opt_param_scheduler=not s.override_opt_param_scheduler)
    return optimizer, scheduler


def _use_fused_kernel(optimizer) -> None:
    """torch's fused AdamW kernel for megatron's torch AdamW (same update, one call per parameter group)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Adam):  # AdamW is one
            for group in inner.param_groups:
                group.update(foreach=False, fused=True)


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
