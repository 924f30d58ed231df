"""The training run's configuration: frozen dataclasses, one per concern, validated once.

:func:`mindspeed_mm.training.arguments.parse_args` fills a :class:`TrainingConfig` from the
flags (each field is named as its flag's ``dest``); :func:`validate` binds it to the world size
and the model's LLM layer count, checks every rule once (a one-line :class:`UserError` naming
the flag) and returns the bound config.  What follows from the flags (data-parallel size,
micro-batches per iteration, layers per stage, warmup steps, ...) is a property, never a field
set afterwards.  No megatron import here: the launcher's ``--preflight`` runs this too.
"""
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional, Tuple

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.parallel import ParallelSettings, stage_layer_counts as counts_from_flags

MAX_CONSECUTIVE_NAN = 10  # NaN/Inf losses in a row that stop a run


@dataclass(frozen=True)
class PathsConfig:
    """Data and model: the two JSONs, the held-out split, the device."""
    mm_data: str
    mm_model: str
    split: str = "100,0,0"
    device: Optional[str] = None
    preflight: bool = False

    @property
    def split_fractions(self) -> List[float]:
        return split_weights(self.split)


@dataclass(frozen=True)
class ParallelConfig:
    """The TP x PP x DP layout, recompute and the process groups."""
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    pipeline_num_layers: Optional[str] = None
    pipeline_layer_index: Optional[str] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    distributed_backend: Optional[str] = None
    distributed_timeout_minutes: int = 30
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # Bound by validate(): not flags, what the flags are checked against.
    world_size: int = 1
    model_layers: Optional[int] = None  # the model's LLM layers

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

    @property
    def stage_layers(self) -> List[int]:
        return stage_layer_counts(self.model_layers, self.pipeline_model_parallel_size, self.pipeline_num_layers,
                                  self.pipeline_layer_index)

    @property
    def layout(self) -> dict:
        """The layout in layout.json's keys (checkpoint/layout.py)."""
        return {"tensor_model_parallel_size": self.tensor_model_parallel_size,
                "pipeline_model_parallel_size": self.pipeline_model_parallel_size,
                "pipeline_num_layers": self.stage_layers}

    def model_settings(self) -> ParallelSettings:
        """What the model needs to build its stage; full recompute defaults to uniform over 1 layer."""
        full = self.recompute_granularity == "full"
        return ParallelSettings(
            tensor_parallel=self.tensor_model_parallel_size, stage_layers=self.stage_layers,
            sequence_parallel=self.sequence_parallel, recompute_granularity=self.recompute_granularity,
            recompute_method=(self.recompute_method or "uniform") if full else self.recompute_method,
            recompute_num_layers=(self.recompute_num_layers or 1) if full else self.recompute_num_layers)


@dataclass(frozen=True)
class BatchConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # None: MBS x DP (TrainingConfig.global_batch_size)
    seq_length: Optional[int] = None
    variable_seq_lengths: bool = False
    packing_max_tokens: Optional[int] = None  # None: data.json's packing; 0: off


@dataclass(frozen=True)
class OptimizationConfig:
    """Adam, clipping and mixed precision."""
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    precision: str = "fp32"
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2.0 ** 32


@dataclass(frozen=True)
class ScheduleConfig:
    """Iterations and the learning-rate schedule (one scheduler step per iteration)."""
    train_iters: Optional[int] = None
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_iters: Optional[int] = None
    lr_warmup_fraction: Optional[float] = None
    lr_warmup_iters: int = 0
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False

    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    @property
    def warmup_steps(self) -> int:
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * self.decay_iters)
        return self.lr_warmup_iters


@dataclass(frozen=True)
class CheckpointConfig:
    load: Optional[str] = None
    save: Optional[str] = None
    save_interval: Optional[int] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    finetune: bool = False
    ckpt_step: Optional[int] = None
    exit_interval: Optional[int] = None


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA (off without --lora-rank): adapters on the targeted linears train, every base weight is frozen
    (mindspeed_mm/models/lora.py); checkpoints then hold the adapters and name their base."""
    lora_rank: Optional[int] = None
    lora_alpha: Optional[float] = None  # None: 2 x rank
    lora_dropout: float = 0.0
    lora_target_modules: Optional[str] = None  # comma-separated; None: the LLM's four linears

    @property
    def enabled(self) -> bool:
        return self.lora_rank is not None

    @property
    def settings(self):
        """models.lora.LoRASettings (validated on construction), or None without LoRA."""
        if not self.enabled:
            return None
        from mindspeed_mm.models.lora import DEFAULT_TARGETS, LoRASettings

        targets = DEFAULT_TARGETS if self.lora_target_modules is None else tuple(
            t.strip() for t in self.lora_target_modules.replace(" ", ",").split(",") if t.strip())
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return LoRASettings(self.lora_rank, alpha, self.lora_dropout, targets)


@dataclass(frozen=True)
class LoggingConfig:
    """Progress lines, TensorBoard and evaluation on the held-out split."""
    log_interval: int = 100
    eval_interval: Optional[int] = None
    eval_iters: int = 100
    tensorboard_dir: Optional[str] = None


@dataclass(frozen=True)
class DebugConfig:
    inject_nan_loss: Optional[str] = None

    @property
    def nan_loss_iters(self) -> FrozenSet[int]:
        return iteration_set(self.inject_nan_loss, "--inject-nan-loss") if self.inject_nan_loss else frozenset()


@dataclass(frozen=True)
class TrainingConfig:
    paths: PathsConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    batches: BatchConfig = field(default_factory=BatchConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    seed: int = 1234
    ignored_flags: Tuple[str, ...] = ()  # the guide's fork-only flags that were given

    # Cross-concern values, derived.
    @property
    def data_parallel_size(self) -> int:
        return self.parallel.data_parallel_size

    @property
    def stage_layers(self) -> List[int]:
        return self.parallel.stage_layers

    @property
    def global_batch_size(self) -> int:
        return self.batches.global_batch_size or self.batches.micro_batch_size * self.data_parallel_size

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per iteration on each data-parallel rank (gradient accumulation)."""
        return self.global_batch_size // (self.batches.micro_batch_size * self.data_parallel_size)

    def to_dict(self) -> dict:
        """Plain values only (saved in checkpoints)."""
        return dataclasses.asdict(self)


# Sub-configs by TrainingConfig field; every flag's dest is one of their fields (or below).
GROUPS = {f.name: f.type for f in dataclasses.fields(TrainingConfig) if dataclasses.is_dataclass(f.type)}
TOP_LEVEL_FLAGS = ("seed",)
UNUSED_FLAGS = ("use_flash_attn",)  # accepted for compatibility: the platform picks the attention kernel


def from_flags(flags: dict, ignored_flags=()) -> TrainingConfig:
    """argparse's values (by dest) -> TrainingConfig; a dest without a field is a bug, not a user error."""
    flags = {k: v for k, v in flags.items() if k not in UNUSED_FLAGS}
    groups = {name: cls(**{f.name: flags.pop(f.name) for f in dataclasses.fields(cls) if f.name in flags})
              for name, cls in GROUPS.items()}
    top = {name: flags.pop(name) for name in TOP_LEVEL_FLAGS}
    if flags:
        raise AssertionError(f"flags without a TrainingConfig field: {sorted(flags)}")
    return TrainingConfig(**groups, **top, ignored_flags=tuple(ignored_flags))


# ---- validation: every rule, once ----------------------------------------------
def validate(config: TrainingConfig, model_cfg, world_size: int) -> TrainingConfig:
    """Check the flags against each other, the model and the world size; the bound config."""
    parallel = dataclasses.replace(config.parallel, world_size=world_size, model_layers=model_cfg.text.num_layers)
    if parallel.sequence_parallel and parallel.tensor_model_parallel_size == 1:
        # Megatron-LM's meaning of the flag: at TP=1 there is nothing to split, so it is dropped (one warning);
        # the model itself refuses sequence parallelism at TP=1 (ParallelSettings).
        if int(os.environ.get("RANK", "0")) == 0:
            warnings.warn("--sequence-parallel is ignored at --tensor-model-parallel-size 1 (nothing to split)",
                          stacklevel=2)
        parallel = dataclasses.replace(parallel, sequence_parallel=False)
    config = dataclasses.replace(config, parallel=parallel)
    _check_layout(config, model_cfg)
    _check_batches(config.batches)
    _check_schedule(config.schedule, config.optimization)
    _check_checkpoints(config.checkpoints)
    _check_lora(config.lora, config.checkpoints)
    _check_logging(config.logging)
    _check_syntax(config)
    return config


def _at_least_one(*flags) -> None:
    for flag, value in flags:
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")


def _check_layout(config: TrainingConfig, model_cfg) -> None:
    p, b = config.parallel, config.batches
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    _at_least_one(("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                  ("--micro-batch-size", b.micro_batch_size), ("--log-interval", config.logging.log_interval))
    if p.context_parallel_size != 1:
        raise UserError("--context-parallel-size: context parallelism is not supported; use 1")
    if p.world_size % (tp * pp):
        raise UserError(f"world size {p.world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                        f"--pipeline-model-parallel-size {pp}")
    dp = p.data_parallel_size
    if config.global_batch_size % (b.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {config.global_batch_size} is not divisible by --micro-batch-size "
                        f"{b.micro_batch_size} x data-parallel size {dp}")
    model_cfg.check_parallel(tp)
    if p.recompute_granularity == "full" and p.recompute_num_layers is not None and p.recompute_num_layers < 0:
        raise UserError("--recompute-num-layers must be >= 1")
    # The model's own rules, checked as ParallelSettings is built: recompute combinations, the split.
    p.model_settings()


def _check_batches(b: BatchConfig) -> None:
    if not b.variable_seq_lengths and not b.seq_length:
        raise UserError("--seq-length is required unless --variable-seq-lengths is given")
    if b.seq_length is not None and b.seq_length < 2:
        raise UserError(f"--seq-length must be >= 2, got {b.seq_length}")
    if b.packing_max_tokens is not None and b.packing_max_tokens != 0 and b.packing_max_tokens < 2:
        raise UserError(f"--packing-max-tokens must be >= 2 (or 0: no packing), got {b.packing_max_tokens}")


def _check_schedule(s: ScheduleConfig, o: OptimizationConfig) -> None:
    if not s.train_iters or s.train_iters < 1:
        raise UserError("--train-iters must be given and >= 1")
    if s.lr < 0 or s.min_lr < 0 or s.min_lr > s.lr:
        raise UserError(f"--min-lr {s.min_lr} must be between 0 and --lr {s.lr}")
    if s.lr_warmup_fraction is not None:
        if s.lr_warmup_iters:
            raise UserError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
        if not 0 <= s.lr_warmup_fraction < 1:
            raise UserError(f"--lr-warmup-fraction must be in [0, 1), got {s.lr_warmup_fraction}")
    if s.warmup_steps >= s.decay_iters:
        raise UserError(f"learning-rate warmup ({s.warmup_steps} iterations) must be shorter than the "
                        f"decay ({s.decay_iters} iterations: --lr-decay-iters or --train-iters)")
    if o.clip_grad < 0:
        raise UserError(f"--clip-grad must be >= 0, got {o.clip_grad}")
    if s.override_opt_param_scheduler and s.use_checkpoint_opt_param_scheduler:
        raise UserError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are mutually "
                        "exclusive: take the new schedule or keep the saved one")


def _check_checkpoints(c: CheckpointConfig) -> None:
    if c.finetune and not c.load:
        raise UserError("--finetune needs --load")
    if c.ckpt_step is not None and not c.load:
        raise UserError("--ckpt-step needs --load")
    if c.save_interval is not None and c.save_interval < 1:
        raise UserError(f"--save-interval must be >= 1, got {c.save_interval}")
    if c.save_interval and not c.save:
        raise UserError("--save-interval needs --save")
    if c.exit_interval is not None and c.exit_interval < 1:
        raise UserError(f"--exit-interval must be >= 1, got {c.exit_interval}")


def _check_lora(lora: LoRAConfig, c: CheckpointConfig) -> None:
    if not lora.enabled:
        for flag, value in (("--lora-alpha", lora.lora_alpha), ("--lora-target-modules", lora.lora_target_modules)):
            if value is not None:
                raise UserError(f"{flag} needs --lora-rank (LoRA is off without it)")
        return
    lora.settings  # rank, alpha, dropout and target names, checked on construction
    if not c.load:
        raise UserError("--lora-rank needs --load: the checkpoint whose weights the adapters train on")


def _check_logging(g: LoggingConfig) -> None:
    if g.eval_interval is not None and g.eval_interval < 1:
        raise UserError(f"--eval-interval must be >= 1, got {g.eval_interval}")
    if g.eval_iters < 0:
        raise UserError(f"--eval-iters must be >= 0, got {g.eval_iters}")


def _check_syntax(config: TrainingConfig) -> None:
    """Flags with a syntax of their own, parsed now so that a mistake stops before anything starts."""
    split_weights(config.paths.split)
    if config.debug.inject_nan_loss:
        iteration_set(config.debug.inject_nan_loss, "--inject-nan-loss")


# ---- flag values with a syntax of their own ---------------------------------------
def stage_layer_counts(num_layers: int, pp: int, num_layers_spec: str = None, layer_index_spec: str = None):
    """LLM layers per pipeline stage: --pipeline-num-layers, --pipeline-layer-index, or an even split."""
    if num_layers_spec is None and layer_index_spec is None:
        if num_layers % pp:
            raise UserError(f"--pipeline-model-parallel-size {pp} does not divide the {num_layers} LLM layers; "
                            f"give --pipeline-num-layers (e.g. {_uneven_example(num_layers, pp)})")
        return [num_layers // pp] * pp
    # Either spelling (0,0,10,20 or "0 0 10 20"), checked by the same rule as the converter's.
    counts = counts_from_flags(num_layers, pipeline_layer_index=layer_index_spec, pipeline_num_layers=num_layers_spec)
    if len(counts) != pp:
        raise UserError(f"the pipeline layer list {counts} has {len(counts)} stages but "
                        f"--pipeline-model-parallel-size is {pp}")
    return counts


def _uneven_example(num_layers, pp):
    base, rest = divmod(num_layers, pp)
    return ",".join(str(base + (i >= pp - rest)) for i in range(pp))


def iteration_set(text: str, flag: str) -> frozenset:
    """'3-12,20' -> {3, ..., 12, 20} (1-based iterations)."""
    out = set()
    for part in text.replace(" ", "").split(","):
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise UserError(f"{flag}: expected iterations like 5 or 3-12,20, got {text!r}") from None
        if first < 1 or last < first:
            raise UserError(f"{flag}: {part!r} is not a range of iterations >= 1")
        out.update(range(first, last + 1))
    return frozenset(out)


def split_weights(spec: str):
    weights = [float(x) for x in spec.replace("/", ",").split(",")] if spec else [100.0]
    weights += [0.0] * (3 - len(weights))
    if len(weights) != 3 or any(w < 0 for w in weights) or weights[0] <= 0:
        raise UserError(f"--split {spec}: expected up to three non-negative weights train,valid,test "
                        f"with train > 0")
    total = sum(weights)
    return [w / total for w in weights]
