"""LoRA adapters on our megatron model against PEFT's LoRA on the HF model, same A/B values.

PEFT adapts HF's separate projections (q/k/v, gate/up, the ViT's fused qkv, the merger's MLP); ours adapt
megatron's fused linears with one adapter per HF projection.  With random non-zero A and B in both, the
loss and the gradient of every adapter tensor match at TP=1, TP=2 (with and without sequence parallelism)
and TP=2 x PP=2 with an empty-LLM first stage, through megatron's pipeline schedule; base weights get no
gradient.  The tiny config has 4 query heads over 2 KV heads, so a q/k/v row-layout slip cannot pass.
"""
import pytest
import torch

from tests.multiproc import run_ranks

RANK, ALPHA = 4, 8.0
GRAD_RTOL = 1e-5
LLM_PEFT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_TARGETS = LLM_PEFT + ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "merger.mlp.0", "merger.mlp.2"]


def peft_model(hf, seed: int = 7, targets=PEFT_TARGETS):
    """PEFT LoRA on ``targets``, A and B drawn at random (B non-zero, unlike PEFT's init)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def peft_adapters(model, grads: bool = False):
    """{<hub module>.lora_A.weight: tensor} (values or gradients) of a PEFT model."""
    from mindspeed_mm.models.mapping import hub_key

    out = {}
    for name, p in model.base_model.model.named_parameters():
        if "lora_" in name:
            module, ab, _, _ = name.rsplit(".", 3)  # <module>.lora_A.default.weight
            out[f"{hub_key(module)}.{ab}.weight"] = (p.grad if grads else p).detach().clone()
    return out


def _rank_run(rank, world, tp, stage_layers, sequence_parallel=False, llm_only=False, recompute=False):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mindspeed_mm.models import lora
    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import build_our_model, hf_forward, hf_model, make_batch, our_config, shift_labels

    init_distributed(platform, tp, len(stage_layers), seed=1)
    hf = hf_model()
    cfg = our_config(hf.config)
    peft = peft_model(hf, targets=LLM_PEFT if llm_only else PEFT_TARGETS)
    targets = lora.DEFAULT_TARGETS if llm_only else lora.TARGETS
    batch = make_batch("right", pad_to_multiple=tp if sequence_parallel else 1)
    ref = hf_forward(peft.base_model.model, batch)
    ref.loss.backward()
    specs = lora.adapter_specs(QWEN2VL.mapping, cfg, targets)
    want = lora.full_to_hf(lora.hf_to_full(peft_adapters(peft, grads=True), specs, cfg), specs, cfg)

    with torch.no_grad():  # the base weights without PEFT's wrappers
        base = {k.replace(".base_layer", ""): v for k, v in peft.base_model.model.state_dict().items()
                if "lora_" not in k}
    hf_plain = hf_model()
    hf_plain.load_state_dict(base)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
        if recompute else {}
    model = build_our_model(hf_plain, cfg, tensor_parallel=tp, stage_layers=stage_layers,
                            sequence_parallel=sequence_parallel, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), **recompute)
    settings = lora.LoRASettings(RANK, ALPHA, targets=targets)
    full = lora.hf_to_full(peft_adapters(peft), specs, cfg)
    tp_rank = ps.get_tensor_model_parallel_rank()
    adapters = lora.apply_lora(model, specs, settings, full, tp, tp_rank)
    labels = shift_labels(batch["labels"])
    count = int((labels != -100).sum())

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(b["input_ids"], None, b["attention_mask"], b["pixel_values"], b["image_grid_thw"], labels=labels)
        return out, lambda o: (o.float().sum() / count, {"loss": o.detach().float().sum() / count})

    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=batch["input_ids"].shape[1], micro_batch_size=2, forward_only=False)
    group = ps.get_tensor_model_parallel_group()
    grads, base_grads = {}, [n for n, p in model.named_parameters() if "lora" not in n and p.grad is not None]
    for name, adapter in adapters.items():
        local = [p.grad if p.grad is not None else torch.zeros_like(p) for p in adapter.local_tensors()]
        for p, g in zip(adapter.local_tensors(), local):
            if getattr(p, "sequence_parallel", False):  # what megatron's finalize_model_grads does
                torch.distributed.all_reduce(g, group=group)
        pieces = []
        for g in local:
            parts = [torch.empty_like(g) for _ in range(tp)]
            torch.distributed.all_gather(parts, g.contiguous(), group=group)
            pieces.append(parts)
        grads.update(lora.merge(adapter.spec, [[pieces[i][r] for i in range(len(local))] for r in range(tp)]))
    loss = float(reports[0]["loss"]) if ps.is_pipeline_last_stage() else None
    destroy_distributed()
    numpy = lambda d: {k: v.detach().numpy().copy() for k, v in d.items()}  # noqa: E731 - tensors do not
    return dict(grads=numpy(grads), loss=loss, ref_loss=float(ref.loss), want=numpy(want),  # cross processes
                base_grads=base_grads, adapters=len(adapters), specs=[s.module for s in specs])


def _check(results, adapted):
    from mindspeed_mm.models import lora
    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from tests.hf_reference import hf_model, our_config

    cfg = our_config(hf_model().config)
    full = {}
    for r in results:
        full.update({k: torch.from_numpy(v) for k, v in r["grads"].items()})
        assert not r["base_grads"], r["base_grads"][:3]
    specs = [s for s in lora.adapter_specs(QWEN2VL.mapping, cfg, lora.TARGETS) if s.module in results[0]["specs"]]
    assert len(specs) == adapted
    ours = lora.full_to_hf(full, specs, cfg)
    want = {k: torch.from_numpy(v) for k, v in results[0]["want"].items()}
    assert set(ours) == set(want)
    worst = {k: float((ours[k] - want[k]).norm() / want[k].norm()) for k in want}
    assert max(worst.values()) <= GRAD_RTOL, sorted(worst.items(), key=lambda kv: -kv[1])[:4]
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses and all(abs(x - results[0]["ref_loss"]) <= 1e-5 * results[0]["ref_loss"] for x in losses), losses


EVERY = 2 * 4 + 3 * 4 + 2  # ViT 2 layers x 4 linears, LLM 3 x 4, projector 2
LLM = 3 * 4


def test_lora_equals_peft_tp1():
    _check(run_ranks(_rank_run, 1, timeout=300, tp=1, stage_layers=[3]), EVERY)


def test_lora_equals_peft_tp2():
    _check(run_ranks(_rank_run, 2, timeout=300, tp=2, stage_layers=[3]), EVERY)


@pytest.mark.slow
def test_lora_equals_peft_tp2_sequence_parallel():
    _check(run_ranks(_rank_run, 2, timeout=300, tp=2, stage_layers=[3], sequence_parallel=True), EVERY)


@pytest.mark.slow
def test_lora_equals_peft_tp2_pp2_empty_llm_first_stage():
    _check(run_ranks(_rank_run, 4, timeout=400, tp=2, stage_layers=[0, 3]), EVERY)


@pytest.mark.slow
def test_lora_llm_only_full_recompute_pp2():
    """The default targets (LLM only) under full recompute: stage 0's first layer is checkpointed with an
    input from frozen weights (the embedding), which must still back-propagate to its adapters."""
    _check(run_ranks(_rank_run, 2, timeout=400, tp=1, stage_layers=[1, 2], llm_only=True, recompute=True), LLM)
