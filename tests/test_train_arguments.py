"""Training flags: Megatron names, later flags win, guide-only flags ignored with one warning,
impossible combinations stop with a one-line error before any process group exists."""
import dataclasses
import os
import subprocess
import sys
import warnings

import pytest

from mindspeed_mm.errors import UserError
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from mindspeed_mm.training.arguments import parse_args
from mindspeed_mm.training.config import validate
from mindspeed_mm.training.flops import BatchShape, forward_flops, train_flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--mm-data", "d.json", "--mm-model", "m.json", "--train-iters", "10", "--seq-length", "64"]


def _cfg():
    return Qwen2VLConfig.load(os.path.join(ROOT, "examples", "qwen2vl", "model_7b.json"))


def _validated(extra, world=8):
    return validate(parse_args(BASE + extra), _cfg(), world)


def test_derived_values_and_later_flags_win():
    args = _validated(["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "4",
                       "--pipeline-num-layers", "0,10,10,8", "--micro-batch-size", "1", "--global-batch-size", "8",
                       "--bf16", "--fp32", "--train-iters", "20"])
    assert args.data_parallel_size == 1 and args.num_microbatches == 8
    assert args.stage_layers == [0, 10, 10, 8]
    assert args.optimization.precision == "fp32" and args.schedule.train_iters == 20  # the last occurrence wins
    args = _validated(["--pipeline-model-parallel-size", "4", "--pipeline-layer-index", "0,0,10,20"], world=4)
    assert args.stage_layers == [0, 10, 10, 8]


def test_config_is_frozen_and_derives_its_values():
    cfg = _validated(["--micro-batch-size", "2", "--lr-warmup-fraction", "0.25", "--lr-decay-iters", "8",
                      "--recompute-granularity", "full"], world=4)
    assert cfg.global_batch_size == 8 and cfg.num_microbatches == 1  # GBS defaults to MBS x DP
    assert cfg.schedule.warmup_steps == 2 and cfg.schedule.decay_iters == 8
    settings = cfg.parallel.model_settings()
    assert (settings.recompute_method, settings.recompute_num_layers) == ("uniform", 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.schedule.lr = 1.0


def test_sequence_parallel_at_tp1_is_dropped_with_one_warning():
    # Megatron-LM's meaning: nothing to split at TP=1; with TP > 1 it stays on.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = _validated(["--sequence-parallel"])
    assert not cfg.parallel.sequence_parallel and not cfg.parallel.model_settings().sequence_parallel
    assert len(caught) == 1 and "--sequence-parallel is ignored" in str(caught[0].message)
    assert _validated(["--sequence-parallel", "--tensor-model-parallel-size", "2"]).parallel.sequence_parallel


def test_guide_only_flags_are_ignored_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = parse_args(BASE + ["--use-mcore-models", "--tokenizer-type", "NullTokenizer", "--swiglu",
                                  "--normalization", "RMSNorm", "--mm-tool", "tools.json"])
    assert len(caught) == 1 and "--tokenizer-type" in str(caught[0].message)
    assert list(args.ignored_flags) == ["--mm-tool", "--normalization", "--swiglu", "--tokenizer-type",
                                  "--use-mcore-models"]


@pytest.mark.parametrize("extra, world, needle", [
    (["--global-batch-size", "6", "--micro-batch-size", "1"], 8, "--global-batch-size 6"),
    (["--tensor-model-parallel-size", "3"], 3, "does not divide text.num_attention_heads"),
    (["--pipeline-model-parallel-size", "4", "--pipeline-num-layers", "0,10,18"], 4, "has 3 stages"),
    (["--pipeline-model-parallel-size", "4", "--pipeline-num-layers", "1,10,10,8"], 4, "summing to"),
    (["--pipeline-model-parallel-size", "3"], 3, "does not divide the 28 LLM layers"),
    (["--tensor-model-parallel-size", "3"], 8, "world size 8 is not divisible"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"], 8, "mutually exclusive"),
    (["--min-lr", "1", "--lr", "0.1"], 8, "--min-lr"),
    (["--save-interval", "5"], 8, "--save-interval needs --save"),
    (["--context-parallel-size", "2"], 8, "context parallelism"),
])
def test_impossible_combinations_are_one_line_errors(extra, world, needle):
    with pytest.raises(UserError) as err:
        _validated(extra, world)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_unknown_flag_is_a_one_line_cli_error():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_qwen2vl.py"), *BASE, "--bogus-flag"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: unrecognized arguments: --bogus-flag"]


def test_flops_count_real_tokens_and_frozen_parts():
    cfg = _cfg()
    short, long = BatchShape([100], [[1, 8, 8]]), BatchShape([200], [[1, 8, 8]])
    f_short, f_long = forward_flops(cfg, short, 152064), forward_flops(cfg, long, 152064)
    assert f_short["vision"] == f_long["vision"] and f_long["language"] > 2 * f_short["language"] * 0.99
    full = train_flops(cfg, short, 152064)
    assert full == 3 * sum(f_short.values())
    cfg.freeze_vision_encoder = True  # nothing upstream trainable: the ViT runs forward only
    assert train_flops(cfg, short, 152064) == f_short["vision"] + 3 * (f_short["projector"] + f_short["language"])
