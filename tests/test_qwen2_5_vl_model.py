"""Our Qwen2.5-VL equals transformers' Qwen2_5_VLForConditionalGeneration: ViT features, logits, loss and
every gradient, at TP=1, TP=2 and TP=2 x PP=2 (an empty-LLM first stage: pipeline split [0, 3]).

The tiny reference (tests/hf_reference_2_5.py) is built to break symmetric mistakes: windows of 2 x 2
merged tokens that split a 6 x 10-patch image unevenly (and an image that is exactly one window, where HF
pads an empty one), full attention in ViT block 1 of 4 only, 4 query heads over 2 KV heads, M-RoPE
sections [2, 3, 3], videos at absolute time with non-integer steps (tokens_per_second 2 x 0.7 s), a ViT
narrower than the LLM.  Positions are computed by the model (position_ids None) from the grids and
second_per_grid_ts, except where a check passes them.

All of it runs in one set of 4 gloo processes (one start-up), in three phases on the same process group:
TP=1 (rank 0 computes, the others wait; also full recompute and LoRA on every target, the ViT's gate / up /
down included, against HF with the adapters folded in), TP=2 (ranks 0-1 compute, also checking every mapping row's split
kind against the built megatron parameter), TP=2 x PP=2 through megatron-core's pipeline schedule, with
backward.  Gradients come back as numpy arrays and are merged by the spec's own merge_shards.
"""
import copy

import pytest

from tests.multiproc import run_ranks

FEATURES_ATOL = 1e-5
LOGITS_ATOL = 1e-5  # as tests/test_model_tp1.py and tests/test_model_parallel.py
REL_TOL = 1e-5
STAGES = [0, 3]  # the PP=2 split: ViT + merger + embedding | all 3 LLM layers + head

# name: (per-sample vision items in text order, padding side)
CASES = {
    # three image sizes: partial windows (6x10), exactly one window (4x4), portrait (8x4); sample 1 shorter
    "images": ([[("image", (1, 6, 10)), ("image", (1, 4, 4))], [("image", (1, 8, 4))]], "right"),
    "images_left": ([[("image", (1, 6, 10)), ("image", (1, 4, 4))], [("image", (1, 8, 4))]], "left"),
    # a video with an image, a video with partial windows per frame, a text-only sample; 0.7 s and 1.2 s
    "videos": ([[("video", (3, 4, 6)), ("image", (1, 6, 10))], [("video", (2, 6, 10))], []], "right"),
}
GRAD_CASE = "videos"  # loss.backward on it: every ViT, merger and LLM parameter gets a gradient


def _rel(ours, ref):
    return float(abs(ours - ref).max() / max(float(abs(ref).max()), 1e-12))


def _measure(model, batch, gather=lambda x: x, logits=True):
    """Our ViT features (first stage) and logits / per-token loss (last stage) for one batch."""
    import torch

    from tests.hf_reference import shift_labels
    from tests.hf_reference_2_5 import our_forward, our_vision_features

    out = {}
    with torch.no_grad():
        if model.pre_process:
            out["features"] = our_vision_features(model, batch).numpy()
        if logits:
            out["logits"] = gather(our_forward(model, batch)).numpy()
            out["per_token"] = our_forward(model, batch, labels=shift_labels(batch["labels"])).numpy()
    return out


def _grads(model):
    return {n: p.grad.detach().clone().numpy() for n, p in model.named_parameters() if p.grad is not None}


def _backward(model, batch):
    from tests.hf_reference import shift_labels
    from tests.hf_reference_2_5 import our_forward

    labels = shift_labels(batch["labels"])
    model.zero_grad()
    loss = our_forward(model, batch, labels=labels).sum() / (labels != -100).sum()
    loss.backward()
    return float(loss.detach())


def _tp1_phase(platform):
    import torch

    from mindspeed_mm.models.rope_index import get_rope_index
    from mindspeed_mm.platform.distributed import init_distributed
    from tests.hf_reference_2_5 import build_our_model, hf_model, make_batch, our_forward

    init_distributed(platform, 1, 1, seed=1)
    if torch.distributed.get_rank() != 0:
        return None
    hf = hf_model()
    model = build_our_model(hf).eval()
    out = {"cases": {name: _measure(model, make_batch(*CASES[name])) for name in CASES}}
    c = model.cfg
    batch = make_batch(*CASES["videos"])
    rope = dict(spatial_merge_size=2, image_token_id=c.image_token_id, video_token_id=c.video_token_id,
                video_grid_thw=batch["video_grid_thw"])
    out["positions"] = get_rope_index(batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"],
                                      second_per_grid_ts=batch["second_per_grid_ts"],
                                      tokens_per_second=c.vision.tokens_per_second, **rope)[0].numpy()
    out["positions_no_seconds"] = get_rope_index(batch["input_ids"], batch["image_grid_thw"],
                                                 batch["attention_mask"], tokens_per_second=2, **rope)[0].numpy()
    out["positions_qwen2vl_rule"] = get_rope_index(batch["input_ids"], batch["image_grid_thw"],
                                                   batch["attention_mask"], second_per_grid_ts=[5.0, 5.0],
                                                   **rope)[0].numpy()
    with torch.no_grad():  # training's path: the data pipeline's positions given
        out["given_positions_logits"] = our_forward(model, batch, torch.from_numpy(out["positions"])).numpy()
    # negative control: the same weights with full attention in every ViT block are not HF's
    layers = model.vision_encoder.blocks.layers
    windowed = [layer for layer in layers if not layer.full_attention]
    assert len(windowed) == len(layers) - 1
    for layer in windowed:
        layer.full_attention = True
    out["all_full_features"] = _measure(model, batch, logits=False)["features"]
    for layer in windowed:
        layer.full_attention = False
    model.train()
    out["loss"] = _backward(model, make_batch(*CASES[GRAD_CASE]))
    out["grads"] = {(0, 0): _grads(model)}
    # full recompute (ViT blocks included: each layer still picks its window / frame boundaries)
    recomputed = build_our_model(hf, recompute_granularity="full", recompute_method="uniform",
                                 recompute_num_layers=1).train()
    out["recompute_loss"] = _backward(recomputed, make_batch(*CASES[GRAD_CASE]))
    out["recompute_grads"] = {(0, 0): _grads(recomputed)}
    out["lora_logits_diff"] = _lora_vs_merged_hf(hf, batch)
    return out


def _lora_vs_merged_hf(hf, batch):
    """LoRA on every target (the ViT's gate/up as two adapters of linear_fc1, down, qkv, proj, the merger, the
    LLM) with non-zero B: our logits vs HF's with the adapters folded into its weights."""
    import torch

    from mindspeed_mm.models import lora
    from mindspeed_mm.models.mapping import hub_key
    from mindspeed_mm.models.qwen2_5_vl import QWEN2_5_VL
    from tests.hf_reference import VOCAB, hf_state
    from tests.hf_reference_2_5 import build_our_model, hf_forward, our_config, our_forward

    cfg = our_config(hf.config)
    settings = lora.LoRASettings(rank=4, alpha=8.0, targets=lora.TARGETS)
    specs = lora.adapter_specs(QWEN2_5_VL.mapping, cfg, settings.targets)
    gen = torch.Generator().manual_seed(5)
    full = {k: torch.randn(v.shape, generator=gen) * 0.1 if ".lora_B." in k else v
            for k, v in lora.init_full(specs, settings.rank, seed=3).items()}
    model = build_our_model(hf, cfg).eval()
    lora.apply_lora(model, specs, settings, full, 1, 0)
    base = dict(QWEN2_5_VL.hf_view(QWEN2_5_VL.hf_to_mm(hf_state(hf), cfg), cfg))
    merged = lora.merged_weights(base, lora.full_to_hf(full, specs, cfg), specs, settings.scale)
    assert any(".mlp.gate_proj." in n for n in merged) and any(".mlp.up_proj." in n for n in merged)
    folded = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in folded.named_parameters():
            if hub_key(name) in merged:
                p.copy_(merged[hub_key(name)])
        ref, ours = hf_forward(folded, batch), our_forward(model, batch)
    real = batch["attention_mask"].bool()
    return float((ours[..., :VOCAB] - ref.logits)[real].abs().max())


def _built_split_attrs(model):
    """name -> (tensor_model_parallel, partition_dim, local shape) of every built parameter."""
    out = {}
    for name, p in model.named_parameters():
        tp = bool(getattr(p, "tensor_model_parallel", False))
        out[name] = (tp, getattr(p, "partition_dim", None) if tp else None, tuple(p.shape))
    return out


def _tp2_phase(platform):
    import torch
    from megatron.core import parallel_state as ps

    from mindspeed_mm.platform.distributed import init_distributed
    from tests.hf_reference_2_5 import build_our_model, hf_model, make_batch

    ps.destroy_model_parallel()
    init_distributed(platform, 2, 1, seed=1)
    if ps.get_data_parallel_rank() != 0:  # the other TP pair would repeat the same work
        return None

    def gather(shard):  # [b, s, V/TP] -> [b, s, V]
        pieces = [torch.empty_like(shard) for _ in range(2)]
        torch.distributed.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(pieces, dim=-1)

    hf = hf_model()
    model = build_our_model(hf, tensor_parallel=2).eval()
    tp = ps.get_tensor_model_parallel_rank()
    out = {"cases": {name: _measure(model, make_batch(*CASES[name]), gather) for name in ("images", "videos")},
           "split_attrs": _built_split_attrs(model), "tp_rank": tp}
    model.train()
    out["loss"] = _backward(model, make_batch(*CASES[GRAD_CASE]))
    out["grads"] = {(tp, 0): _grads(model)}
    return out


def _tp2_pp2_phase(platform):
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mindspeed_mm.platform.distributed import init_distributed
    from tests.hf_reference import shift_labels
    from tests.hf_reference_2_5 import build_our_model, hf_model, make_batch, our_forward

    ps.destroy_model_parallel()
    init_distributed(platform, 2, 2, seed=1)
    hf = hf_model()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    model = build_our_model(hf, tensor_parallel=2, stage_layers=STAGES, pre_process=first, post_process=last)
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    batch = make_batch(*CASES[GRAD_CASE])
    labels = shift_labels(batch["labels"])
    supervised = (labels != -100).sum()

    def run(with_labels, forward_only):
        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = our_forward(model, b, labels=labels if with_labels else None)  # position_ids None on every stage
            if with_labels:
                return out, lambda o: (o.sum() / supervised, {"out": o.detach()})
            return out, lambda o: (o.float().sum(), {"out": o.detach()})

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=batch["input_ids"].shape[1], micro_batch_size=batch["input_ids"].shape[0],
            forward_only=forward_only)

    model.eval()
    logits_out = run(False, True)
    model.train()
    model.zero_grad()
    loss_out = run(True, False)
    out = {"tp_rank": tp, "pp_rank": pp, "grads": {(tp, pp): _grads(model)},
           "has_vit": hasattr(model, "vision_encoder")}
    if first:
        with torch.no_grad():
            out["features"] = _measure(model.eval(), batch, logits=False)["features"]
    if last:
        shard = logits_out[0]["out"]
        pieces = [torch.empty_like(shard) for _ in range(2)]
        torch.distributed.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
        out["logits"] = torch.cat(pieces, dim=-1).numpy()
        out["per_token"] = loss_out[0]["out"].numpy()
    return out


def _all_phases(rank, world):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch

    from mindspeed_mm.platform.distributed import destroy_distributed

    out = {}
    for name, phase in (("tp1", _tp1_phase), ("tp2", _tp2_phase), ("tp2pp2", _tp2_pp2_phase)):
        out[name] = phase(platform)
        torch.distributed.barrier()
    destroy_distributed()
    return out


# ---- the HF side, computed once in the test process -----------------------------------------------

@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_all_phases, 4, timeout=400)


@pytest.fixture(scope="module")
def reference():
    import torch

    from mindspeed_mm.models.qwen2_5_vl import QWEN2_5_VL
    from tests.hf_reference_2_5 import hf_forward, hf_model, hf_vision_features, make_batch, our_config

    torch.manual_seed(0)
    hf = hf_model()
    out = {}
    with torch.no_grad():
        for name in CASES:
            batch = make_batch(*CASES[name])
            ref = hf_forward(hf, batch)
            out[name] = dict(batch=batch, logits=ref.logits.numpy(), loss=float(ref.loss),
                             features=hf_vision_features(hf, batch).numpy())
        batch = make_batch(*CASES["videos"])
        out["positions"] = hf.model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], batch["video_grid_thw"],
            batch["second_per_grid_ts"], batch["attention_mask"])[0].numpy()
        out["positions_no_seconds"] = hf.model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], batch["video_grid_thw"],
            None, batch["attention_mask"])[0].numpy()
    hf.zero_grad()
    ref = hf_forward(hf, make_batch(*CASES[GRAD_CASE]))
    ref.loss.backward()
    cfg = our_config(hf.config)
    out["grad_loss"] = float(ref.loss)
    out["grads"] = {k: v.numpy() for k, v in QWEN2_5_VL.hf_to_mm({k: p.grad for k, p in hf.named_parameters()},
                                                                    cfg).items()}
    out["cfg"] = cfg
    return out


def _check_case(m, ref, name):
    import numpy as np

    from tests.hf_reference import VOCAB, shift_labels

    batch = ref[name]["batch"]
    real = batch["attention_mask"].bool().numpy()  # HF's fully masked left-pad rows are arbitrary
    if "features" in m:
        assert np.abs(m["features"] - ref[name]["features"]).max() < FEATURES_ATOL, name
    logits = m["logits"]
    assert np.abs(logits[..., :VOCAB] - ref[name]["logits"])[real].max() < LOGITS_ATOL, name
    assert logits[..., VOCAB:].max() == -np.inf, name
    assert (logits[..., :VOCAB].argmax(-1) == ref[name]["logits"].argmax(-1))[real].all(), name
    labels = shift_labels(batch["labels"]).numpy()
    loss = float(m["per_token"].sum() / (labels != -100).sum())
    assert abs(loss - ref[name]["loss"]) <= REL_TOL * abs(ref[name]["loss"]), (name, loss, ref[name]["loss"])


def _check_grads(grads_by_rank, ref, stage_layers):
    """Merge the ranks' gradients with the spec (every parameter on its rank) and compare to HF's."""
    import torch

    from mindspeed_mm.models.qwen2_5_vl import QWEN2_5_VL

    shards = {r: {n: torch.from_numpy(g) for n, g in grads.items()} for r, grads in grads_by_rank.items()}
    merged = QWEN2_5_VL.merge_shards(shards, ref["cfg"], stage_layers)  # raises if a gradient is missing
    assert merged.keys() == ref["grads"].keys()
    rel = {n: _rel(merged[n].numpy(), ref["grads"][n]) for n in merged}
    assert any(n.startswith("vision_encoder.blocks.layers.3.mlp.linear_fc1") for n in rel)
    worst = max(rel.items(), key=lambda kv: kv[1])
    assert worst[1] < REL_TOL, worst


@pytest.fixture(scope="module")
def tp1(ranks):
    return ranks[0]["tp1"]


@pytest.mark.parametrize("case", list(CASES))
def test_tp1_features_logits_and_loss_equal_hf(tp1, reference, case):
    _check_case(tp1["cases"][case], reference, case)


def test_positions_use_absolute_video_time_as_hf(tp1, reference):
    import numpy as np

    assert np.array_equal(tp1["positions"], reference["positions"])
    assert np.array_equal(tp1["positions_no_seconds"], reference["positions_no_seconds"])  # 1 s per patch
    assert not np.array_equal(tp1["positions"], tp1["positions_qwen2vl_rule"])  # the time steps matter here
    assert np.array_equal(tp1["given_positions_logits"], tp1["cases"]["videos"]["logits"])


def test_window_attention_matters_in_this_config(tp1, reference):
    import numpy as np

    assert np.abs(tp1["all_full_features"] - reference["videos"]["features"]).max() > 1e-3


def test_tp1_gradients_equal_hf(tp1, reference):
    assert abs(tp1["loss"] - reference["grad_loss"]) <= REL_TOL * reference["grad_loss"]
    _check_grads(tp1["grads"], reference, [3])


def test_full_recompute_gives_the_same_gradients(tp1, reference):
    assert abs(tp1["recompute_loss"] - reference["grad_loss"]) <= REL_TOL * reference["grad_loss"]
    _check_grads(tp1["recompute_grads"], reference, [3])


def test_lora_on_the_gated_vit_mlp_equals_hf_with_adapters_folded_in(tp1):
    assert tp1["lora_logits_diff"] < LOGITS_ATOL, tp1["lora_logits_diff"]


def test_tp2_features_logits_loss_and_gradients_equal_hf(ranks, reference):
    tp2 = [r["tp2"] for r in ranks if r["tp2"] is not None]
    assert sorted(r["tp_rank"] for r in tp2) == [0, 1]
    for r in tp2:
        for name, m in r["cases"].items():
            _check_case(m, reference, name)
        assert abs(r["loss"] - reference["grad_loss"]) <= REL_TOL * reference["grad_loss"]
    _check_grads({k: v for r in tp2 for k, v in r["grads"].items()}, reference, [3])


def test_tp2_split_kinds_match_megatron_parameters(ranks, reference):
    """Every row of the table (the new gated ViT MLP with its biases, RMSNorms) against what megatron builds."""
    import torch

    from mindspeed_mm.models.mapping import COLUMN, GATED_COLUMN, REPLICATED, ROW, VOCAB
    from mindspeed_mm.models.qwen2_5_vl import QWEN2_5_VL

    expected = {REPLICATED: (False, None), COLUMN: (True, 0), GATED_COLUMN: (True, 0), VOCAB: (True, 0),
                ROW: (True, 1)}
    cfg = reference["cfg"]
    for r in (r["tp2"] for r in ranks if r["tp2"] is not None):
        built = r["split_attrs"]
        want = {n: tuple(QWEN2_5_VL.shard_tensor(n, torch.empty(s, device="meta"), cfg, 2, r["tp_rank"]).shape)
                for n, s in QWEN2_5_VL.mapping.ours_shapes(cfg).items()}
        assert set(built) == set(want)
        for name, (tp, dim, shape) in built.items():
            kind = QWEN2_5_VL.mapping.split_kind(name)
            assert (tp, dim) == expected[kind], f"{name}: table says {kind}, megatron builds tp={tp} dim={dim}"
            assert shape == want[name], (name, shape, want[name])


def test_tp2_pp2_empty_llm_first_stage_equals_hf(ranks, reference):
    import numpy as np

    results = [r["tp2pp2"] for r in ranks]
    assert sorted((r["pp_rank"], r["tp_rank"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["has_vit"] == (r["pp_rank"] == 0) for r in results)
    for r in results:
        if r["pp_rank"] == 0:
            assert np.abs(r["features"] - reference[GRAD_CASE]["features"]).max() < FEATURES_ATOL
        else:
            _check_case(r, reference, GRAD_CASE)  # logits and the per-token loss of the backward pass
    _check_grads({k: v for r in results for k, v in r["grads"].items()}, reference, STAGES)


@pytest.mark.parametrize("window_size", [56, 84, 112])
def test_window_index_is_hfs(window_size):
    """The permutation and window boundaries for grids that divide, do not divide, span frames, batch up."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    from mindspeed_mm.models.qwen2_5_vl.vision_encoder import window_index

    grids = torch.tensor([[1, 6, 10], [1, 4, 4], [3, 4, 6], [2, 16, 2], [1, 2, 2], [1, 22, 14]])
    for rows in ([0], [1], [2], list(range(len(grids)))):
        grid = grids[rows]
        order, bounds = window_index(grid, 2, window_size // 2 // 14)
        want_order, want_bounds = get_vision_window_index(grid, spatial_merge_size=2, window_size=window_size,
                                                          patch_size=14)
        assert torch.equal(order, want_order) and bounds == want_bounds.tolist(), (rows, window_size)
    order, bounds = window_index(grids[:1], 2, 2)
    assert bounds == [0, 16, 32, 40, 48, 56, 60]  # 6x10 patches: windows of 4, 4, 2 / 2, 2, 1 merged tokens
