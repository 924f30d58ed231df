"""Training flags: Megatron-LM's names and meanings, checked before any process group exists.

:func:`parse_args` reads the command line; :func:`validate` checks it against the
model config and the world size and raises :class:`UserError` with a one-line
message naming the flag.  Flags that only meant something to the guide's
Megatron fork are accepted and ignored with one warning.
"""
import argparse
import os
import warnings

from mindspeed_mm.errors import UserError

# Flags of the guide's launcher that configure its fork, not this project:
# name -> takes a value.  Model sizes come from the model JSON instead.
GUIDE_ONLY_FLAGS = {
    "--use-mcore-models": False, "--use-fused-rmsnorm": False, "--swiglu": False,
    "--use-fused-swiglu": False, "--no-masked-softmax-fusion": False,
    "--no-gradient-accumulation-fusion": False, "--log-tps": False, "--use-fused-rotary-pos-emb": False,
    "--tokenizer-type": True, "--vocab-size": True, "--make-vocab-size-divisible-by": True,
    "--normalization": True, "--mm-tool": True, "--ckpt-format": True, "--model-type": True,
    "--context-parallel-algo": True, "--num-workers": True, "--position-embedding-type": True,
}

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
MAX_CONSECUTIVE_NAN = 10  # NaN/Inf losses in a row that stop a run


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UserError (one line) instead of printing usage and exiting."""

    def error(self, message):
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="pretrain_qwen2vl.py", description="Fine-tune Qwen2-VL on megatron-core.",
                        allow_abbrev=False)
    g = p.add_argument_group("data and model")
    g.add_argument("--mm-data", required=True, help="data JSON (the guide's data.json)")
    g.add_argument("--mm-model", required=True, help="model JSON, or a converted checkpoint's model.json / dir")
    g.add_argument("--split", default="100,0,0",
                   help="train,valid,test weights of a deterministic split of the data; valid feeds --eval-*")
    g.add_argument("--device", default=None, help="auto|npu|cuda|cpu (default: auto, or $MM_DEVICE)")
    g.add_argument("--preflight", action="store_true",
                   help="check the flags, JSONs, checkpoint and save folder, then exit (the launchers run "
                        "this before torchrun; WORLD_SIZE gives the number of processes to check for)")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-num-layers", default=None,
                   help="LLM layers per pipeline stage, e.g. 0,10,10,8 (the first stage may hold only the "
                        "vision encoder); default: an even split")
    g.add_argument("--pipeline-layer-index", default=None,
                   help="the guide's form: first LLM layer of each stage, e.g. 0,0,10,20")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--distributed-backend", default=None, choices=("nccl", "hccl", "gloo"))
    g.add_argument("--distributed-timeout-minutes", type=int, default=30)

    g = p.add_argument_group("batches")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per optimizer step; gradient accumulation = GBS / (MBS x DP)")
    g.add_argument("--seq-length", type=int, default=None,
                   help="the longest sample, in tokens (image tokens included): longer samples are dropped "
                        "and counted; without --variable-seq-lengths every micro-batch is also padded to it")
    g.add_argument("--variable-seq-lengths", action="store_true",
                   help="micro-batches keep their own (padded-to-longest) length, at most --seq-length")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear", choices=LR_DECAY_STYLES)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on resume, follow the schedule these flags give (lr, min-lr, warmup, decay, style) "
                        "from the checkpoint's iteration on, instead of the saved one")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true",
                   help="on resume, keep the checkpoint's saved schedule whatever these flags say")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", dest="precision", action="store_const", const="bf16")
    g.add_argument("--fp16", dest="precision", action="store_const", const="fp16")
    g.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                   help="(default) full precision, for CPU debugging and exactness checks")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: a static loss scale")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--recompute-granularity", default=None, choices=("full", "selective"))
    g.add_argument("--recompute-method", default=None, choices=("uniform", "block"))
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--use-flash-attn", action="store_true",
                   help="accepted for compatibility: the platform already picks the fused attention kernel "
                        "(flash-attn / npu_fusion_attention) when the device has one")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", default=None, help="a converted checkpoint (release) or a training SAVE dir")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="load weights only and start at iteration 0 (fresh optimizer, schedule and data)")
    g.add_argument("--ckpt-step", type=int, default=None, metavar="ITERATION",
                   help="load this iteration of --load instead of the one its tracker file names "
                        "(e.g. the previous one when the latest is damaged)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving) when the iteration is a multiple of N")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)

    g = p.add_argument_group("debugging")
    g.add_argument("--inject-nan-loss", default=None, metavar="ITERATIONS",
                   help="make the loss (and so every gradient) of these iterations NaN, e.g. 5 or 3-12,20: "
                        "rehearses the NaN/Inf handling (the update is skipped and counted in the log; "
                        f"{MAX_CONSECUTIVE_NAN} in a row stop the run)")
    return p


def _strip_guide_only(argv):
    """Remove the guide's fork-only flags (and their values); return (kept, removed names)."""
    kept, removed, i = [], [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in GUIDE_ONLY_FLAGS:
            removed.append(name)
            takes_value = GUIDE_ONLY_FLAGS[name] and "=" not in argv[i]
            i += 2 if takes_value else 1
            continue
        kept.append(argv[i])
        i += 1
    return kept, removed


def parse_args(argv=None) -> argparse.Namespace:
    """Parse; later occurrences of a flag win (so extra launcher arguments override)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, ignored = _strip_guide_only(argv)
    args = build_parser().parse_args(argv)
    if args.precision is None:
        args.precision = "fp32"
    args.ignored_flags = sorted(set(ignored))
    if args.ignored_flags and int(os.environ.get("RANK", "0")) == 0:
        warnings.warn(f"ignoring flags of the guide's Megatron fork that mean nothing here: "
                      f"{' '.join(args.ignored_flags)}", stacklevel=2)
    return args


def stage_layer_counts(num_layers: int, pp: int, num_layers_spec: str = None, layer_index_spec: str = None):
    """LLM layers per pipeline stage: --pipeline-num-layers, --pipeline-layer-index, or an even split."""
    from mindspeed_mm.models.parallel import stage_layer_counts as counts_from_flags

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


def validate(args, model_cfg, world_size: int) -> None:
    """Check flags against the model and world size; fill derived values on ``args``.

    Sets ``args.data_parallel_size``, ``args.num_microbatches``, ``args.stage_layers``,
    ``args.split_fractions``, ``args.lr_warmup_steps`` and ``args.nan_loss_iters``.
    """
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--micro-batch-size", args.micro_batch_size), ("--log-interval", args.log_interval)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.context_parallel_size != 1:
        raise UserError("--context-parallel-size: context parallelism is not supported; use 1")
    if world_size % (tp * pp):
        raise UserError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                        f"--pipeline-model-parallel-size {pp}")
    dp = world_size // (tp * pp)
    args.data_parallel_size = dp
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                        f"{args.micro_batch_size} x data-parallel size {dp}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    model_cfg.check_parallel(tp)
    args.stage_layers = stage_layer_counts(model_cfg.text.num_layers, pp, args.pipeline_num_layers,
                                           args.pipeline_layer_index)
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to split
    if not args.variable_seq_lengths and not args.seq_length:
        raise UserError("--seq-length is required unless --variable-seq-lengths is given")
    if args.seq_length is not None and args.seq_length < 2:
        raise UserError(f"--seq-length must be >= 2, got {args.seq_length}")

    if not args.train_iters or args.train_iters < 1:
        raise UserError("--train-iters must be given and >= 1")
    if args.lr < 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise UserError(f"--min-lr {args.min_lr} must be between 0 and --lr {args.lr}")
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise UserError("--lr-warmup-fraction and --lr-warmup-iters are mutually exclusive")
        if not 0 <= args.lr_warmup_fraction < 1:
            raise UserError(f"--lr-warmup-fraction must be in [0, 1), got {args.lr_warmup_fraction}")
        args.lr_warmup_steps = int(args.lr_warmup_fraction * decay_iters)
    else:
        args.lr_warmup_steps = args.lr_warmup_iters
    if args.lr_warmup_steps >= decay_iters:
        raise UserError(f"learning-rate warmup ({args.lr_warmup_steps} iterations) must be shorter than the "
                        f"decay ({decay_iters} iterations: --lr-decay-iters or --train-iters)")
    args.lr_decay_iters = decay_iters
    if args.clip_grad < 0:
        raise UserError(f"--clip-grad must be >= 0, got {args.clip_grad}")

    if args.recompute_method and args.recompute_granularity != "full":
        raise UserError("--recompute-method needs --recompute-granularity full")
    if args.recompute_granularity == "full":
        args.recompute_method = args.recompute_method or "uniform"
        args.recompute_num_layers = args.recompute_num_layers or 1
        if args.recompute_num_layers < 1:
            raise UserError("--recompute-num-layers must be >= 1")

    if args.finetune and not args.load:
        raise UserError("--finetune needs --load")
    if args.ckpt_step is not None and not args.load:
        raise UserError("--ckpt-step needs --load")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise UserError("--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler are mutually "
                        "exclusive: take the new schedule or keep the saved one")
    if args.save_interval is not None and args.save_interval < 1:
        raise UserError(f"--save-interval must be >= 1, got {args.save_interval}")
    if args.save_interval and not args.save:
        raise UserError("--save-interval needs --save")
    if args.exit_interval is not None and args.exit_interval < 1:
        raise UserError(f"--exit-interval must be >= 1, got {args.exit_interval}")
    if args.eval_interval is not None and args.eval_interval < 1:
        raise UserError(f"--eval-interval must be >= 1, got {args.eval_interval}")
    if args.eval_iters < 0:
        raise UserError(f"--eval-iters must be >= 0, got {args.eval_iters}")
    args.split_fractions = split_weights(args.split)
    args.nan_loss_iters = iteration_set(args.inject_nan_loss, "--inject-nan-loss") if args.inject_nan_loss \
        else frozenset()
