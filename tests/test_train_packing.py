"""Sequence packing against the unpacked run and Hugging Face.

* a packed row's logits, per sample, equal HF's on that sample alone, and its M-RoPE positions equal
  HF's ``get_rope_index`` of the sample alone;
* attention never crosses samples: changing one sample leaves the other's logits bit-identical;
* through the training step (megatron DDP, the pipeline schedule, per-token loss), one packed micro-batch
  gives the loss and every gradient of the unpacked run of the same samples, within 1e-6 relative, at TP1,
  TP2 with sequence parallelism, and PP2 with an empty-LLM first stage.

The samples are tests/hf_reference.py's: one with two images of different shapes, one text-only, plus a
third with an image and a fourth with a video clip and an image, so that a pack mixes image, video and text
samples and images in three samples.
"""
import pytest
import torch

from tests.hf_reference import IMAGE_GRIDS, PAD_ID, PATCH_DIM, TOKENS, VOCAB, make_batch
from tests.multiproc import run_ranks

LOGITS_ATOL = 1e-5
GRAD_RTOL = 1e-6


def _samples(seed: int = 0):
    """Four unpadded samples as Qwen2VLDataset items (positions by the model's rule, images per sample)."""
    batch = make_batch("right", seed=seed)
    rows = []
    first_patches = sum(t * h * w for t, h, w in IMAGE_GRIDS)
    for b, (pixels, grid) in enumerate([(batch["pixel_values"], batch["image_grid_thw"]), (None, None)]):
        n = int(batch["attention_mask"][b].sum())
        rows.append((batch["input_ids"][b, :n], batch["labels"][b, :n], pixels, grid))
    # a third sample: text, one 4x4-patch image, an answer
    g = torch.Generator().manual_seed(seed + 9)
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.cat([torch.randint(0, 2000, (3,), generator=g), torch.tensor(
        [TOKENS["vision_start_token_id"]] + [TOKENS["image_token_id"]] * 4 + [TOKENS["vision_end_token_id"]]),
        torch.randint(0, 2000, (5,), generator=g)])
    labels = torch.full_like(ids, -100)
    labels[-4:] = ids[-4:]
    rows.append((ids, labels, torch.randn(16, PATCH_DIM, generator=g), grid))
    assert first_patches == batch["pixel_values"].shape[0]
    out = []
    for ids, labels, pixels, grid in rows:
        out.append(_item(ids, labels, pixels, grid))
    # a fourth: a 2x2x4-patch video clip (4 tokens), text, a 2x2-patch image, an answer
    vs, ve = TOKENS["vision_start_token_id"], TOKENS["vision_end_token_id"]
    ids = torch.cat([torch.tensor([vs] + [TOKENS["video_token_id"]] * 4 + [ve]), torch.randint(0, 2000, (4,), generator=g),
                     torch.tensor([vs, TOKENS["image_token_id"], ve]), torch.randint(0, 2000, (6,), generator=g)])
    labels = torch.full_like(ids, -100)
    labels[-5:] = ids[-5:]
    out.append(_item(ids, labels, torch.randn(4, PATCH_DIM, generator=g), torch.tensor([[1, 2, 2]]),
                     torch.randn(16, PATCH_DIM, generator=g), torch.tensor([[2, 2, 4]])))
    return out


def _item(ids, labels, pixels, grid, video_pixels=None, video_grid=None):
    """A Qwen2VLDataset item: positions by the model's rule, HF's mm_token_type_ids (1 image, 2 video)."""
    from mindspeed_mm.models.rope_index import get_rope_index

    pos, _ = get_rope_index(ids[None], grid, None, spatial_merge_size=2, image_token_id=TOKENS["image_token_id"],
                            video_token_id=TOKENS["video_token_id"], video_grid_thw=video_grid)
    mm = (ids == TOKENS["image_token_id"]).long() + 2 * (ids == TOKENS["video_token_id"]).long()
    return dict(input_ids=ids, labels=labels, position_ids=pos[:, 0], mm_token_type_ids=mm, pixel_values=pixels,
                image_grid_thw=grid, pixel_values_videos=video_pixels, video_grid_thw=video_grid)


def _packed(samples, multiple: int = 1, min_length: int = 0):
    from mindspeed_mm.data.collate import PackedCollator

    return PackedCollator(PAD_ID, multiple, min_length)(samples)


def _unpacked(samples, multiple: int = 1):
    from mindspeed_mm.data.collate import Qwen2VLCollator

    return Qwen2VLCollator(PAD_ID, multiple)(samples)


def _hf_alone(hf, sample):
    with torch.no_grad():
        return hf(input_ids=sample["input_ids"][None], pixel_values=sample["pixel_values"],
                  image_grid_thw=sample["image_grid_thw"], pixel_values_videos=sample["pixel_values_videos"],
                  video_grid_thw=sample["video_grid_thw"], mm_token_type_ids=sample["mm_token_type_ids"][None],
                  use_cache=False).logits[0]


def _ours(model, batch):
    with torch.no_grad():
        return model(batch["input_ids"], batch["position_ids"], batch["attention_mask"], batch["pixel_values"],
                     batch["image_grid_thw"], cu_seqlens=batch["cu_seqlens"],
                     pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"])[0]


def _model_checks(rank, world):
    """In a fresh process (the platform shim stays out of pytest's): per-sample HF parity of a packed row,
    its positions, and what changing one sample moves."""
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import build_our_model, hf_model

    init_distributed(platform, 1, 1, seed=1)
    hf = hf_model()
    model = build_our_model(hf).eval()
    samples = _samples()
    out = {"logits_diff": [], "positions_equal": []}
    batch = _packed(samples, min_length=96)  # a trailing padding segment too
    cu = batch["cu_seqlens"].tolist()
    out["cu"], out["first_labels"] = cu, batch["labels"][0, cu[:-1]].tolist()
    logits = _ours(model, batch)
    for k, s in enumerate(samples):
        a, b = cu[k], cu[k + 1]
        want_pos, _ = hf.model.get_rope_index(s["input_ids"][None], s["mm_token_type_ids"][None].int(),
                                              image_grid_thw=s["image_grid_thw"], video_grid_thw=s["video_grid_thw"],
                                              attention_mask=torch.ones_like(s["input_ids"])[None])
        out["positions_equal"].append(torch.equal(batch["position_ids"][:, 0, a:b], want_pos[:, 0]))
        out["logits_diff"].append(float((logits[a:b, :VOCAB] - _hf_alone(hf, s)).abs().max()))
    # changing sample k (its text and its pixels) moves sample k's logits only
    base, cu = _ours(model, _packed(samples)), _packed(samples)["cu_seqlens"].tolist()
    out["moved"] = []
    for changed in range(len(samples)):
        other = [dict(s) for s in samples]
        ids = other[changed]["input_ids"].clone()
        text = ids < 2000
        ids[text] = (ids[text] + 7) % 2000
        other[changed]["input_ids"] = ids
        for key in ("pixel_values", "pixel_values_videos"):
            if other[changed][key] is not None:
                other[changed][key] = other[changed][key] + 1.0
        moved = _ours(model, _packed(other))
        out["moved"].append([not torch.equal(moved[cu[k]:cu[k + 1]], base[cu[k]:cu[k + 1]])
                             for k in range(len(samples))])
    destroy_distributed()
    return out


@pytest.fixture(scope="module")
def model_checks():
    (result,) = run_ranks(_model_checks, 1, timeout=300)
    return result


def test_packed_row_equals_hf_per_sample_and_positions_restart(model_checks):
    cu = model_checks["cu"]
    assert cu[-1] == 96 and len(cu) == 4 + 2  # four samples and the padding segment
    assert all(model_checks["positions_equal"]), model_checks["positions_equal"]
    assert max(model_checks["logits_diff"]) < LOGITS_ATOL, model_checks["logits_diff"]
    assert all(x == -100 for x in model_checks["first_labels"])  # no sample learns the next one's first token


def test_attention_never_crosses_samples(model_checks):
    for changed, moved in enumerate(model_checks["moved"]):
        assert moved == [k == changed for k in range(len(moved))], (changed, moved)


def _grads(rank, world, tp, pp_layers, sequence_parallel=False):
    """Loss and gradients of the training step on the packed row vs on the padded, unpacked batch."""
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.build import build_model
    from mindspeed_mm.training.config import validate
    from mindspeed_mm.training.step import run_global_batch
    from tests.hf_reference import hf_model, hf_state, our_config

    pp = len(pp_layers)
    flags = ["--mm-data", "unused.json", "--mm-model", "unused.json", "--fp32", "--variable-seq-lengths",
             "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
             "--pipeline-num-layers", ",".join(map(str, pp_layers)), "--micro-batch-size", "1",
             "--global-batch-size", "1", "--train-iters", "1", *(["--sequence-parallel"] if sequence_parallel else [])]
    hf = hf_model()
    cfg = our_config(hf.config)
    config = validate(parse_args(flags), cfg, world)
    init_distributed(platform, tp, pp, seed=1)
    from mindspeed_mm.models.qwen2vl import QWEN2VL

    model = build_model(config, cfg)
    model.module.load_full_state(QWEN2VL.hf_to_mm(hf_state(hf), cfg))
    samples = _samples()
    multiple = tp if sequence_parallel else 1
    results = {}
    for name, batch in (("packed", _packed(samples, multiple)), ("unpacked", _unpacked(samples, multiple))):
        model.zero_grad_buffer()
        total = run_global_batch(model, [batch], config)
        grads = {n: p.main_grad.detach().clone() for n, p in model.module.named_parameters() if p.requires_grad}
        results[name] = (float(total[0] / total[1]), int(total[1]), grads)
    destroy_distributed()
    (loss_p, tok_p, g_p), (loss_u, tok_u, g_u) = results["packed"], results["unpacked"]
    assert tok_p == tok_u
    worst = max(float((g_p[n] - g_u[n]).norm() / g_u[n].norm().clamp_min(1e-30)) for n in g_u)
    zero = [n for n in g_u if float(g_u[n].norm()) == 0.0]
    return dict(loss_packed=loss_p, loss_unpacked=loss_u, worst_grad_rel=worst, params=len(g_u), zero=zero)


def _check_grads(results):
    for r in results:
        assert abs(r["loss_packed"] - r["loss_unpacked"]) <= GRAD_RTOL * abs(r["loss_unpacked"]), r
        assert r["worst_grad_rel"] <= GRAD_RTOL, r
        assert r["params"] > 0 and not r["zero"], r


def test_packed_gradients_equal_unpacked_tp1():
    _check_grads(run_ranks(_grads, 1, timeout=300, tp=1, pp_layers=[3]))


@pytest.mark.slow
def test_packed_gradients_equal_unpacked_tp2_sequence_parallel():
    _check_grads(run_ranks(_grads, 2, timeout=400, tp=2, pp_layers=[3], sequence_parallel=True))


@pytest.mark.slow
def test_packed_gradients_equal_unpacked_pp2_empty_llm_first_stage():
    _check_grads(run_ranks(_grads, 2, timeout=400, tp=1, pp_layers=[0, 3]))


# ---- through pretrain_qwen2vl.py: DP=2, distributed optimizer, recompute, resume ----------------------------

def _with_packing(data_json: str, max_tokens: int) -> str:
    import json

    with open(data_json) as f:
        config = json.load(f)
    config["packing"] = {"max_tokens": max_tokens, "window": 8}
    path = data_json.replace(".json", "_packed.json")
    with open(path, "w") as f:
        json.dump(config, f, indent=1)
    return path


def _consumed(out: str) -> list:
    import re

    return [int(n) for n in re.findall(r"consumed samples:\s+(\d+)", out)]


@pytest.mark.slow
def test_packed_run_resumes_exactly_dp2_distributed_optimizer_recompute(tmp_path):
    """16 samples of 61-77 tokens packed into rows of at most 220 (2 or 3 samples each), global batches of
    4 packs over DP=2 x 2 micro-batches, full recompute, the distributed optimizer, shuffled: a run of 2
    iterations resumed for 2 more gives iterations 3-4's losses and data position of one 4-iteration run
    (each epoch fills one global batch and leaves its tail packs to the next epoch's plan, so every
    iteration crosses an epoch)."""
    import os

    from tests.train_fixtures import convert, losses, make_data, make_hf_model, run_training, train_flags

    hf = make_hf_model(str(tmp_path / "hf"))
    ckpt = convert(hf, str(tmp_path / "mm"), 1, [2])
    data = _with_packing(make_data(str(tmp_path / "data"), hf, num_images=16, shuffle=True), 220)
    extra = ["--use-distributed-optimizer", "--recompute-granularity", "full", "--recompute-method", "uniform",
             "--recompute-num-layers", "1"]

    def flags(iters, *more):
        return train_flags(data, os.path.join(ckpt, "model.json"), iters=iters, gbs=4, extra=[*extra, *more])

    _, whole = run_training(flags(4, "--load", ckpt), nprocs=2)
    assert "data: packing 16 samples into" in whole and "efficiency" in whole, whole[-3000:]
    save = str(tmp_path / "save")
    run_training(flags(2, "--load", ckpt, "--save", save), nprocs=2)
    _, resumed = run_training(flags(4, "--load", save, "--save", save), nprocs=2)
    reference, second = losses(whole), losses(resumed)
    assert sorted(reference) == [1, 2, 3, 4] and sorted(second) == [3, 4], (reference, second)
    for it in (3, 4):
        assert abs(second[it] - reference[it]) <= 1e-5 * abs(reference[it]), (it, second[it], reference[it])
    # the data position counts samples, not packs (4 packs of 2-3 samples per global batch)
    steps = _consumed(whole)
    assert _consumed(resumed) == steps[2:], (steps, _consumed(resumed))
    assert all(8 <= b - a <= 12 for a, b in zip([0] + steps, steps)), steps
