"""Full fine-tuning steps against HF: our training step as pretrain_qwen2vl.py builds it on the CPU (megatron
DDP, distributed Adam run by torch's fused kernel, clipping, the TP-1 linears as plain F.linear and torch's
cross-entropy) next to ``Qwen2VLForConditionalGeneration`` + torch AdamW (its default per-tensor loop) +
clip_grad_norm_, same weights, same batch of drawn conversations with images.  The losses follow each other
step by step and every weight after the steps equals HF's.  And the plain linears compute what megatron's
parallel linears compute, output and gradients."""
import tempfile

import pytest

from tests.multiproc import run_ranks

LR, STEPS = 1e-3, 5


def _steps(rank, world):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch

    from mindspeed_mm.models.linear import ColumnLinear, RowLinear
    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.training.checkpointing import unwrap
    from mindspeed_mm.training.step import train_step
    from scripts.bench_train import training_flags
    from tests.train_fixtures import small_pair

    init_distributed(platform, 1, 1, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        batch, hf, config, model, optimizer, scheduler = small_pair(
            tmp, lambda model_json: training_flags(model_json, 2, LR), vit_layers=2)
    stage = unwrap(model)
    linears = [m for m in stage.modules() if isinstance(m, (ColumnLinear, RowLinear))]
    groups = [g for opt in optimizer.chained_optimizers for g in opt.optimizer.param_groups]
    adamw = torch.optim.AdamW(hf.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    hf_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values",
                                      "image_grid_thw", "labels")}
    before = {k: v.detach().clone() for k, v in stage.state_dict().items() if isinstance(v, torch.Tensor)}
    ours, theirs = [], []
    for i in range(STEPS):
        ours.append(train_step(model, optimizer, scheduler, [batch], config, iteration=i + 1).loss)
        adamw.zero_grad()
        loss = hf(**hf_batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        adamw.step()
        theirs.append(float(loss))
    want = QWEN2VL.hf_to_mm({k: v.detach() for k, v in hf.state_dict().items()}, stage.cfg)
    got = stage.state_dict()
    # Each tensor's difference to HF relative to how far the steps moved it (Frobenius norms).
    weights = {k: float((got[k] - w).norm() / (w - before[k]).norm().clamp_min(1e-12)) for k, w in want.items()}
    destroy_distributed()
    return dict(ours=ours, theirs=theirs, weights=weights, linears=len(linears),
                plain=all(m.plain for m in linears), fused=all(g["fused"] for g in groups))


@pytest.mark.slow
def test_full_finetuning_steps_follow_hf():
    (r,) = run_ranks(_steps, 1, timeout=400)
    assert r["plain"] and r["linears"] >= 10 and r["fused"], r  # the lean paths are the ones measured
    gaps = [abs(a - b) / abs(b) for a, b in zip(r["ours"], r["theirs"])]
    assert max(gaps) < 1e-5, (r["ours"], r["theirs"])
    assert r["ours"][-1] < r["ours"][0] - 0.05, r["ours"]  # it learned
    # Within 1e-3 of how far each tensor moved: the key biases' gradient is 0 in exact arithmetic (a constant
    # added to every key of a query), so theirs is rounding noise that Adam turns into full-size steps on both
    # sides (2e-4 measured for them, <= 6e-5 for every other tensor).
    worst = max(r["weights"], key=r["weights"].get)
    assert r["weights"][worst] < 1e-3, (worst, r["weights"][worst])
    others = {k: v for k, v in r["weights"].items() if not k.endswith("linear_qkv.bias")}
    assert max(others.values()) < 2e-4, sorted(others.items(), key=lambda kv: -kv[1])[:3]


def _linears(rank, world):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch
    from megatron.core.transformer import TransformerConfig

    from mindspeed_mm.models.linear import ColumnLinear, RowLinear
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed

    init_distributed(platform, 1, 1, seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                               gradient_accumulation_fusion=False, params_dtype=torch.float32)
    gaps = {}
    for name, make in {
        "column": lambda: ColumnLinear(16, 24, config=config, init_method=torch.nn.init.normal_, bias=True),
        "column_skip_bias": lambda: ColumnLinear(16, 24, config=config, init_method=torch.nn.init.normal_,
                                                 bias=True, skip_bias_add=True),
        "row": lambda: RowLinear(24, 16, config=config, init_method=torch.nn.init.normal_, bias=True,
                                 input_is_parallel=True, skip_bias_add=False),
        "row_skip_bias": lambda: RowLinear(24, 16, config=config, init_method=torch.nn.init.normal_, bias=True,
                                           input_is_parallel=True, skip_bias_add=True),
    }.items():
        results = []
        for plain in (True, False):
            torch.manual_seed(0)
            layer = make()
            assert layer.plain
            layer.plain = plain  # False: megatron's own forward (its autograd function and region copies)
            x = torch.randn(5, 3, layer.input_size, requires_grad=True)
            out, bias = layer(x)
            total = out if bias is None else out + bias
            (total * torch.arange(total.numel()).view_as(total).sin()).sum().backward()
            results.append([out, x.grad, layer.weight.grad, layer.bias.grad, bias])
        gaps[name] = max(float((a - b).abs().max()) if a is not None else 0.0 for a, b in zip(*results))
        assert (results[0][4] is None) == (results[1][4] is None)
    destroy_distributed()
    return gaps


def test_plain_linears_equal_megatrons():
    (gaps,) = run_ranks(_linears, 1, timeout=120)
    assert max(gaps.values()) < 1e-5, gaps
