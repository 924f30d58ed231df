"""Videos through our Qwen2-VL: logits, loss and gradients equal transformers' Qwen2VLForConditionalGeneration.

Batches are built as HF's processors build them (tests/hf_reference.make_mm_batch): a video of grid
(t, h, w) is t*h*w patch rows of width 3*2*14*14 = 1176 and t*h*w/4 ``<|video_pad|>`` tokens between
``<|vision_start|>`` and ``<|vision_end|>``; HF also gets ``mm_token_type_ids`` (text 0, image 1, video 2).
Our model computes the M-RoPE positions itself (position_ids None) unless a check says otherwise.

One process measures TP=1 (logits, loss, every gradient, token-count errors); two gloo processes
measure TP=2 and then, on the same process group, PP=2 through megatron-core's pipeline schedule
(stage 0: ViT + projector + 1 LLM layer; stage 1: 2 layers + head, computing its positions from
video_grid_thw).  The tests below assert on the measurements.
"""
import pytest

from tests.multiproc import run_ranks

LOGITS_ATOL = 1e-5  # as tests/test_model_tp1.py and tests/test_model_parallel.py
REL_TOL = 1e-5
VIDEO_A, VIDEO_B = (2, 4, 6), (3, 2, 4)  # 12 and 6 video tokens
# name: (per-sample vision items in text order, padding side)
CASES = {
    "video_only": ([[("video", VIDEO_A)]], "right"),
    "image_then_video": ([[("image", (1, 4, 6)), ("video", VIDEO_B)]], "right"),
    # sample 0 image then video, sample 1 video then image, sample 2 text only: different lengths, padded
    "mixed_batch": ([[("image", (1, 8, 4)), ("video", VIDEO_A)], [("video", VIDEO_B), ("image", (1, 4, 6))], []],
                    "right"),
    "mixed_batch_left": ([[("image", (1, 8, 4)), ("video", VIDEO_A)], [("video", VIDEO_B), ("image", (1, 4, 6))],
                          []], "left"),
}
TP2_CASES = ("video_only", "image_then_video", "mixed_batch")
PP2_CASE = "mixed_batch"


def _rel(ours, ref):
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def _compare(logits, per_token, ref, batch):
    """logits [b, s, padded V] (whole vocabulary), per-token loss [b, s] vs HF's output."""
    from tests.hf_reference import VOCAB, shift_labels

    labels = shift_labels(batch["labels"])
    real = batch["attention_mask"].bool()  # HF's fully masked left-pad rows are arbitrary
    return dict(logits_diff=float((logits[..., :VOCAB] - ref.logits)[real].abs().max()),
                padded_columns=float(logits[..., VOCAB:].max()),
                argmax_equal=bool((logits[..., :VOCAB].argmax(-1) == ref.logits.argmax(-1))[real].all()),
                loss=float(per_token.sum() / (labels != -100).sum()), hf_loss=float(ref.loss))


def _case_diffs(model, hf, names, gather=lambda x: x):
    import torch

    from tests.hf_reference import hf_forward_mm, make_mm_batch, our_forward_mm, shift_labels

    out = {}
    for name in names:
        layouts, side = CASES[name]
        batch = make_mm_batch(layouts, side)
        with torch.no_grad():
            ref = hf_forward_mm(hf, batch)
            logits = gather(our_forward_mm(model, batch))
            per_token = our_forward_mm(model, batch, labels=shift_labels(batch["labels"]))
        out[name] = _compare(logits, per_token, ref, batch)
    return out


def _given_positions(model, hf):
    """Training's path: the data pipeline's positions (get_rope_index with video_grid_thw) passed in."""
    import torch

    from mindspeed_mm.models.rope_index import get_rope_index
    from tests.hf_reference import hf_forward_mm, make_mm_batch, our_forward_mm, shift_labels

    cfg = model.cfg
    batch = make_mm_batch(*CASES["mixed_batch"])
    pos, _ = get_rope_index(batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"],
                            spatial_merge_size=cfg.vision.spatial_merge_size, image_token_id=cfg.image_token_id,
                            video_token_id=cfg.video_token_id, video_grid_thw=batch["video_grid_thw"])
    with torch.no_grad():
        ref = hf_forward_mm(hf, batch)
        logits = our_forward_mm(model, batch, position_ids=pos)
        per_token = our_forward_mm(model, batch, position_ids=pos, labels=shift_labels(batch["labels"]))
    return _compare(logits, per_token, ref, batch)


def _video_grads(hf, freeze_vision_encoder=False):
    """loss.backward through HF and ours on the video-only sample: relative gradient differences."""
    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from tests.hf_reference import build_our_model, hf_forward_mm, make_mm_batch, our_config, our_forward_mm, \
        shift_labels

    batch = make_mm_batch(*CASES["video_only"])
    hf.zero_grad()
    ref = hf_forward_mm(hf, batch)
    ref.loss.backward()
    cfg = our_config(hf.config)
    cfg.freeze_vision_encoder = freeze_vision_encoder
    model = build_our_model(hf, cfg).train()
    labels = shift_labels(batch["labels"])
    loss = our_forward_mm(model, batch, labels=labels).sum() / (labels != -100).sum()
    loss.backward()
    want = QWEN2VL.hf_to_mm({k: p.grad for k, p in hf.named_parameters()}, model.cfg)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return dict(loss=float(loss), hf_loss=float(ref.loss),
                without_grad=sorted(n for n, g in grads.items() if g is None),
                rel={n: _rel(g, want[n]) for n, g in grads.items() if g is not None})


def _errors(model):
    """The messages of the UserErrors that mismatched videos raise (None: nothing raised)."""
    import torch

    from mindspeed_mm.errors import UserError
    from tests.hf_reference import make_mm_batch, our_forward_mm

    def message(batch):
        try:
            with torch.no_grad():
                our_forward_mm(model, batch, position_ids=torch.zeros(3, *batch["input_ids"].shape, dtype=torch.long))
        except UserError as exc:
            return str(exc)
        return None

    out = {}
    batch = make_mm_batch(*CASES["mixed_batch"])
    ids = batch["input_ids"] = batch["input_ids"].clone()
    ids[1, ids[1].tolist().index(model.cfg.video_token_id)] = 5  # sample 1 loses one of its 6 video tokens
    out["token_missing"] = message(batch)
    batch = make_mm_batch(*CASES["mixed_batch"])
    batch["video_grid_thw"] = batch["video_grid_thw"][:1]  # the last video's grid row is lost
    batch["pixel_values_videos"] = batch["pixel_values_videos"][:48]
    out["grid_missing"] = message(batch)
    batch = make_mm_batch(*CASES["mixed_batch"])
    batch["pixel_values_videos"] = batch["pixel_values_videos"][:-4]  # patch rows != grid
    out["pixels_short"] = message(batch)
    return out


def _tp1_checks(rank, world):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import build_our_model, hf_model

    init_distributed(platform, 1, 1, seed=1)
    hf = hf_model()
    model = build_our_model(hf).eval()
    results = dict(cases=_case_diffs(model, hf, CASES), given_positions=_given_positions(model, hf),
                   errors=_errors(model))
    results["grads"] = _video_grads(hf)
    results["grads_frozen_vit"] = _video_grads(hf, freeze_vision_encoder=True)
    destroy_distributed()
    return results


def _tp2_then_pp2(rank, world):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import (build_our_model, hf_forward_mm, hf_model, make_mm_batch, our_forward_mm,
                                    shift_labels)

    init_distributed(platform, 2, 1, seed=1)
    hf = hf_model()

    def gather(shard):  # [b, s, V/TP] -> [b, s, V]
        pieces = [torch.empty_like(shard) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(pieces, dim=-1)

    model = build_our_model(hf, tensor_parallel=2).eval()
    results = dict(tp2=_case_diffs(model, hf, TP2_CASES, gather), tp2_vocab_columns=gather(
        our_forward_mm(model, make_mm_batch(*CASES["video_only"])).detach()).shape[-1])

    ps.destroy_model_parallel()  # same process group, now two pipeline stages
    init_distributed(platform, 1, 2, seed=1)
    model = build_our_model(hf, stage_layers=[1, 2], pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage()).eval()
    batch = make_mm_batch(*CASES[PP2_CASE])
    labels = shift_labels(batch["labels"])

    def run(with_labels):
        def forward_step(data_iterator, model):
            b = next(data_iterator)
            out = our_forward_mm(model, b, labels=labels if with_labels else None)  # position_ids None
            return out, lambda o: (o.float().sum(), {"out": o.detach()})

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
            seq_length=batch["input_ids"].shape[1], micro_batch_size=batch["input_ids"].shape[0],
            forward_only=True)

    logits_out, loss_out = run(False), run(True)
    if ps.is_pipeline_last_stage():
        with torch.no_grad():
            ref = hf_forward_mm(hf, batch)
        results["pp2"] = _compare(logits_out[0]["out"], loss_out[0]["out"], ref, batch)
        results["pp2_stage_has_vit"] = hasattr(model, "vision_encoder")
    destroy_distributed()
    return results


@pytest.fixture(scope="module")
def tp1():
    (results,) = run_ranks(_tp1_checks, 1, timeout=300)
    return results


@pytest.fixture(scope="module")
def parallel():
    return run_ranks(_tp2_then_pp2, 2, timeout=300)


def _assert_equal_hf(m):
    assert m["logits_diff"] < LOGITS_ATOL and m["argmax_equal"], m
    assert m["padded_columns"] == float("-inf"), m
    assert abs(m["loss"] - m["hf_loss"]) <= REL_TOL * abs(m["hf_loss"]), m


@pytest.mark.parametrize("case", list(CASES))
def test_tp1_logits_and_loss_equal_hf(tp1, case):
    _assert_equal_hf(tp1["cases"][case])


def test_tp1_given_positions_with_videos_equal_hf(tp1):
    _assert_equal_hf(tp1["given_positions"])


def test_video_gradients_equal_hf(tp1):
    m = tp1["grads"]
    assert abs(m["loss"] - m["hf_loss"]) <= REL_TOL * abs(m["hf_loss"]), m
    assert not m["without_grad"], m["without_grad"]
    vit = {n: r for n, r in m["rel"].items() if n.startswith(("vision_encoder.", "vision_projector."))}
    assert any(n.startswith("vision_encoder.blocks.") for n in vit) and "vision_encoder.patch_embed.weight" in vit
    worst = max(m["rel"].items(), key=lambda kv: kv[1])
    assert worst[1] < REL_TOL, worst


def test_frozen_vit_gets_no_gradient_from_videos_but_projector_does(tp1):
    m = tp1["grads_frozen_vit"]
    assert m["without_grad"] and all(n.startswith("vision_encoder.") for n in m["without_grad"]), m["without_grad"]
    projector = {n: r for n, r in m["rel"].items() if n.startswith("vision_projector.")}
    assert projector and max(projector.values()) < REL_TOL, projector


def test_video_token_count_mismatch_names_the_sample(tp1):
    msg = tp1["errors"]["token_missing"]
    assert msg == ("sample 1: 5 video tokens but video_grid_thw rows 1..1 give 6 video features "
                   "(videos are matched to samples in order)"), msg


def test_missing_video_grid_row_names_the_sample(tp1):
    msg = tp1["errors"]["grid_missing"]
    assert msg is not None and msg.startswith("sample 1: 6 video tokens") and "\n" not in msg, msg


def test_video_patch_rows_must_match_grid(tp1):
    msg = tp1["errors"]["pixels_short"]
    assert msg == "pixel_values_videos has 68 patch rows but video_grid_thw gives 72", msg


@pytest.mark.parametrize("case", TP2_CASES)
def test_tp2_logits_and_loss_equal_hf(parallel, case):
    assert parallel[0]["tp2_vocab_columns"] == 2304
    for r in parallel:
        _assert_equal_hf(r["tp2"][case])


def test_pp2_second_stage_computes_video_positions(parallel):
    last = [r for r in parallel if "pp2" in r]
    assert len(last) == 1 and not last[0]["pp2_stage_has_vit"], last
    _assert_equal_hf(last[0]["pp2"])
