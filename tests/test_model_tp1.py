"""Our Qwen2-VL at TP=1/PP=1 computes what transformers' Qwen2VLForConditionalGeneration computes.

One process (megatron needs its parallel state) measures everything; the
tests below assert on the measurements.  Weights reach our model through
QWEN2VL.hf_to_mm + the table-driven shard_state.
"""
import pytest

from tests.multiproc import run_ranks

LOGITS_ATOL = 1e-5
REL_TOL = 1e-5
VISION_GRIDS = ([(1, 2, 2)], [(1, 4, 4), (1, 6, 2)], [(1, 10, 8)], [(2, 4, 6)])
RECOMPUTE = {
    "none": {},
    "full_uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full_block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective": dict(recompute_granularity="selective"),
}


def _rel(ours, ref):
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _logit_diffs(model, hf, make_batch, hf_forward, vocab):
    import torch

    out = {}
    for side in ("right", "left"):
        batch = make_batch(side)
        with torch.no_grad():
            ref = hf_forward(hf, batch, with_labels=False).logits
            logits = model(batch["input_ids"], None, batch["attention_mask"], batch["pixel_values"],
                           batch["image_grid_thw"])
        real = batch["attention_mask"].bool()  # HF's fully masked left-pad rows are arbitrary
        out[side] = float((logits[..., :vocab] - ref)[real].abs().max())
        out[side + "_padded_columns"] = float(logits[..., vocab:].max())
        out[side + "_argmax_equal"] = bool((logits.argmax(-1) == ref.argmax(-1))[real].all())
    return out


def _loss_and_grads(hf, recompute):

    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from tests.hf_reference import build_our_model, hf_forward, make_batch, shift_labels

    batch = make_batch("right")
    hf.zero_grad()
    ref = hf_forward(hf, batch)
    ref.loss.backward()
    model = build_our_model(hf, **recompute).train()  # megatron recomputes only in training mode (dropout 0)
    calls = {"llm": 0, "vit": 0}  # core-attention runs per step: 2 when recomputed in backward
    first_layers = {"llm": model.language_model.decoder.layers[0], "vit": model.vision_encoder.blocks.layers[0]}
    for key, layer in first_layers.items():
        layer.self_attention.core_attention.register_forward_hook(
            lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    labels = shift_labels(batch["labels"])
    per_token = model(batch["input_ids"], batch_position_ids(batch, model), batch["attention_mask"],
                      batch["pixel_values"], batch["image_grid_thw"], labels=labels)
    loss = per_token.sum() / (labels != -100).sum()
    loss.backward()
    want = QWEN2VL.hf_to_mm({k: p.grad for k, p in hf.named_parameters()}, model.cfg)
    grads = {n: p.grad for n, p in model.named_parameters()}
    missing = sorted(n for n, g in grads.items() if g is None)
    rel = {n: _rel(g, want[n]) for n, g in grads.items() if g is not None}
    return dict(loss=float(loss), hf_loss=float(ref.loss), grad_rel=rel, missing_grads=missing, calls=calls,
                n_params=len(grads), per_token_shape=tuple(per_token.shape),
                ignored_zero=bool((per_token[labels == -100] == 0).all()))


def batch_position_ids(batch, model):
    """The data pipeline's M-RoPE positions (our get_rope_index), as training passes them."""
    from mindspeed_mm.models.rope_index import get_rope_index

    cfg = model.cfg
    pos, _ = get_rope_index(batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"],
                            spatial_merge_size=cfg.vision.spatial_merge_size, image_token_id=cfg.image_token_id,
                            video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id)
    return pos


def _vision_diffs(model, hf):
    import torch

    from tests.hf_reference import PATCH_DIM

    out = {}
    for grids in VISION_GRIDS:
        grid = torch.tensor(grids)
        pixels = torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = hf.model.visual(pixels, grid_thw=grid)
            patches = model.vision_encoder(pixels, grid)
            feats = model.vision_projector(patches)
        out[str(grids)] = (_rel(patches, ref.last_hidden_state), float((feats - ref.pooler_output).abs().max()))
    return out


def _freeze_checks(hf):
    """Per frozen part: which parameters still get gradients and optimizer state."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from tests.hf_reference import build_our_model, make_batch, our_config, shift_labels

    batch = make_batch("right")
    out = {}
    for part in ("vision_encoder", "vision_projector", "language_model"):
        cfg = our_config(hf.config)
        setattr(cfg, f"freeze_{part}", True)
        model = build_our_model(hf, cfg).train()
        ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3), [ddp])
        labels = shift_labels(batch["labels"])
        loss = ddp(batch["input_ids"], None, batch["attention_mask"], batch["pixel_values"],
                   batch["image_grid_thw"], labels=labels).sum()
        loss.backward()
        in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
        names = {id(p): n for n, p in model.named_parameters()}
        out[part] = dict(
            trainable=sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}),
            with_grad=sorted({n.split(".")[0] for n, p in model.named_parameters()
                              if getattr(p, "main_grad", None) is not None and bool(p.main_grad.abs().sum() > 0)}),
            optimized=sorted({names[i].split(".")[0] for i in in_optimizer if i in names}))
        del ddp, opt
    return out


def _bf16_loss(hf):
    """bf16 parameters: same weights rounded, loss close to HF's fp32 loss."""
    import torch

    from tests.hf_reference import build_our_model, hf_forward, make_batch, our_config, shift_labels

    model = build_our_model(hf, our_config(hf.config, dtype="bf16")).eval()
    batch = make_batch("right")
    labels = shift_labels(batch["labels"])
    with torch.no_grad():
        per_token = model(batch["input_ids"], None, batch["attention_mask"], batch["pixel_values"],
                          batch["image_grid_thw"], labels=labels)
        ref = hf_forward(hf, batch).loss
    return dict(loss=float(per_token.sum() / (labels != -100).sum()), hf_loss=float(ref),
                dtypes=sorted({str(p.dtype) for p in model.parameters()}))


def _image_token_error(model, make_batch):
    import torch

    from mindspeed_mm.errors import UserError

    batch = make_batch("right")
    ids = batch["input_ids"].clone()
    ids[0, ids[0].tolist().index(model.cfg.image_token_id)] = 5  # sample 0 loses one image token
    try:
        with torch.no_grad():
            model(ids, torch.zeros(3, *ids.shape, dtype=torch.long), batch["attention_mask"],
                  batch["pixel_values"], batch["image_grid_thw"])
    except UserError as exc:
        return str(exc)
    return None


def _tp1_checks(rank, world):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import VOCAB, build_our_model, hf_config, hf_forward, hf_model, make_batch

    init_distributed(platform, 1, 1, seed=1)
    hf = hf_model()
    model = build_our_model(hf).eval()
    results = dict(logits=_logit_diffs(model, hf, make_batch, hf_forward, VOCAB),
                   vision=_vision_diffs(model, hf), image_token_error=_image_token_error(model, make_batch))
    tied = hf_model(hf_config(tie_word_embeddings=True), seed=1)
    results["tied_logits"] = _logit_diffs(build_our_model(tied).eval(), tied, make_batch, hf_forward, VOCAB)
    results["grads"] = {name: _loss_and_grads(hf, kw) for name, kw in RECOMPUTE.items()}
    results["bf16"] = _bf16_loss(hf)
    results["freeze"] = _freeze_checks(hf)
    destroy_distributed()
    return results


@pytest.fixture(scope="module")
def measured():
    (results,) = run_ranks(_tp1_checks, 1, timeout=400)
    return results


@pytest.mark.parametrize("which", ["logits", "tied_logits"])
def test_logits_equal_hf(measured, which):
    m = measured[which]
    assert m["right"] < LOGITS_ATOL and m["left"] < LOGITS_ATOL, m
    assert m["right_argmax_equal"] and m["left_argmax_equal"], m
    assert m["right_padded_columns"] == float("-inf") and m["left_padded_columns"] == float("-inf"), m


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
def test_loss_and_every_gradient_equal_hf(measured, recompute):
    m = measured["grads"][recompute]
    assert m["per_token_shape"] == (2, 31) and m["ignored_zero"], m
    runs = 1 if recompute == "none" else 2
    assert m["calls"] == {"llm": runs, "vit": runs}, m["calls"]
    assert abs(m["loss"] - m["hf_loss"]) <= REL_TOL * abs(m["hf_loss"]), m
    assert not m["missing_grads"], m["missing_grads"]
    worst = max(m["grad_rel"].items(), key=lambda kv: kv[1])
    assert worst[1] < REL_TOL, worst
    assert len(m["grad_rel"]) == m["n_params"]


def test_bf16_parameters_run_close_to_fp32_reference(measured):
    m = measured["bf16"]
    assert m["dtypes"] == ["torch.bfloat16"], m
    assert abs(m["loss"] - m["hf_loss"]) < 2e-2 * m["hf_loss"], m


def test_vision_features_equal_hf_for_several_sizes(measured):
    for grids, (patch_rel, feature_diff) in measured["vision"].items():
        assert patch_rel < REL_TOL and feature_diff < LOGITS_ATOL, (grids, patch_rel, feature_diff)


def test_image_token_count_mismatch_names_sample_and_counts(measured):
    msg = measured["image_token_error"]
    assert msg is not None and msg.startswith("sample 0: 13 image tokens") and "give 14 image features" in msg, msg


@pytest.mark.parametrize("part", ["vision_encoder", "vision_projector", "language_model"])
def test_frozen_part_gets_no_gradient_and_no_optimizer_state(measured, part):
    m = measured["freeze"][part]
    everything = ["language_model", "vision_encoder", "vision_projector"]
    rest = [p for p in everything if p != part]
    assert m["trainable"] == rest and m["optimized"] == rest, m
    assert m["with_grad"] == rest, m
