"""Training flags: Megatron-LM's names and meanings, parsed once into a TrainingConfig.

:func:`parse_args` reads the command line into :class:`~mindspeed_mm.training.config.TrainingConfig`
(its :func:`~mindspeed_mm.training.config.validate` checks it against the model config and the
world size, with one-line messages naming the flag).  Flags that only meant something to the
guide's Megatron fork are accepted and ignored with one warning.  No megatron import here.
"""
import argparse
import os
import sys
import warnings

from mindspeed_mm.errors import UserError
from mindspeed_mm.training.config import MAX_CONSECUTIVE_NAN, TrainingConfig, from_flags

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
    g.add_argument("--packing-max-tokens", type=int, default=None,
                   help="sequence packing: rows of at most this many tokens, each several whole samples "
                        "(overrides data.json's packing.max_tokens; 0 turns packing off); micro- and global "
                        "batch sizes then count packs")

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

    g = p.add_argument_group("LoRA (off without --lora-rank)")
    g.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank on the target linears; every base weight is frozen")
    g.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha / rank (default: 2 x rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    g.add_argument("--lora-target-modules", default=None, metavar="MODULES",
                   help="comma-separated megatron linears: linear_qkv, linear_proj, linear_fc1, linear_fc2 (the "
                        "LLM's, the default), vision.<same> (the ViT's), projector.linear_fc1, projector.linear_fc2")

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
    p.set_defaults(precision="fp32")
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


def parse_args(argv=None) -> TrainingConfig:
    """Parse; later occurrences of a flag win (so extra launcher arguments override)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, ignored = _strip_guide_only(argv)
    flags = vars(build_parser().parse_args(argv))
    ignored = sorted(set(ignored))
    if ignored and int(os.environ.get("RANK", "0")) == 0:
        warnings.warn(f"ignoring flags of the guide's Megatron fork that mean nothing here: "
                      f"{' '.join(ignored)}", stacklevel=2)
    return from_flags(flags, ignored)
