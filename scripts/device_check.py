"""One prepared accelerator check (issue 13): GPU-only tests, then the MFU of a 2B-shaped model, as ONE table.

    bash scripts/device_check.sh             # on a CUDA GPU (a lent H200): bf16, flash-attn when installed
    bash scripts/device_check.sh --dry-run   # here, on the CPU: fp32, sdpa only, a tiny MFU loop

Rows (each stage runs in its own process, so a crash or a hang fails its rows, not the table):

* model vs HF: our Qwen2VLModel (bf16 on the GPU) against transformers' Qwen2VLForConditionalGeneration
  in fp32 on the CPU, same tiny random weights (tests/hf_reference.py): logits ||ours - ref|| / ||ref||
  over the real tokens, and the loss;
* flash-attn varlen == SDPA: platform/attention.py CoreAttention, backend "flash" against "sdpa", on one
  packed row (cu_seqlens with a trailing padding segment), causal GQA (LLM) and bidirectional (ViT);
  without flash-attn the row says so, and torch's own varlen kernel stands in;
* packed == unpacked: the two samples of the reference batch as one PackedCollator row (cu_seqlens)
  against the padded batch: logits of every sample and the summed loss;
* MFU: the training step of pretrain_qwen2vl.py (megatron DDP, distributed Adam, bf16; built from
  launcher flags as scripts/bench_train.py does) on examples/qwen2vl/model_2b.json with random weights,
  micro-batches packed to 4096 tokens from drawn LLaVA-like samples (one 224-672 px image each), 20
  iterations, the first 3 not timed.  FLOPs: training/flops.py train_flops on the real tokens (padding
  left out, recomputation not counted), divided by the dense bf16 peak (default 989.4 TFLOP/s, the
  H100/H200 SXM datasheet figure; the device notes measured ~790 on a matrix product, also shown).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SPEC_PEAK_TFLOPS = 989.4  # dense bf16, H100/H200 SXM datasheet
MEASURED_PEAK_TFLOPS = 790.0  # 8192^3 bf16 matmul on a lent H200 (device notes, KINDS.md)
# Tolerances: (gpu bf16, dry-run fp32). Relative norms ||a - b|| / ||b||.
TOL = {
    "model_logits": (3e-2, 1e-5),
    "model_loss": (2e-2, 1e-5),
    "attention": (1e-2, 1e-5),
    "packed_logits": (2e-2, 1e-5),
    "packed_loss": (1e-2, 1e-5),
}
STAGE_TIMEOUT = {"tests": 240, "mfu": 330}  # seconds, inside the wrapper's overall timeout
RUN_COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
               "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; "
               "set -o pipefail; bash scripts/device_check.sh 2>&1 | tee $OUT/device_check.log")


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def row(check, ok, measured, bound):
    """One table row; ok: True (PASS), False (FAIL), None (SKIP), 'info'."""
    result = {True: "PASS", False: "FAIL", None: "SKIP", "info": "INFO"}[ok]
    return {"check": check, "result": result, "measured": measured, "bound": bound}


# ---------------------------------------------------------------- stage "tests"

def packing_available():
    """(True, '') when PackedCollator and Qwen2VLModel.forward(cu_seqlens=) exist, else (False, why)."""
    import inspect

    from mindspeed_mm.data import collate
    from mindspeed_mm.models.qwen2vl.model import Qwen2VLModel

    if not hasattr(collate, "PackedCollator"):
        return False, "packing not available: mindspeed_mm.data.collate has no PackedCollator"
    if "cu_seqlens" not in inspect.signature(Qwen2VLModel.forward).parameters:
        return False, "packing not available: Qwen2VLModel.forward takes no cu_seqlens"
    return True, ""


def check_model_vs_hf(hf, model, device, dtype, gpu):
    import torch

    from tests.hf_reference import VOCAB, hf_forward, make_batch, shift_labels

    batch = make_batch("right")
    with torch.no_grad():
        ref = hf_forward(hf, batch)
        args = [batch["input_ids"].to(device), None, batch["attention_mask"].to(device),
                batch["pixel_values"].to(device, dtype), batch["image_grid_thw"].to(device)]
        logits = model(*args)[..., :VOCAB].float().cpu()
        labels = shift_labels(batch["labels"]).to(device)
        loss = float(model(*args, labels=labels).sum() / (labels != -100).sum())
    real = batch["attention_mask"].bool()
    logit_rel = rel(logits[real], ref.logits[real])
    agree = float((logits.argmax(-1) == ref.logits.argmax(-1))[real].float().mean())
    loss_rel = abs(loss - float(ref.loss)) / abs(float(ref.loss))
    tl, tloss = TOL["model_logits"][not gpu], TOL["model_loss"][not gpu]
    what = "bf16 on GPU" if gpu else "fp32 on CPU"
    return [row(f"model ({what}) vs HF fp32: logits", logit_rel < tl, f"rel {logit_rel:.1e}, argmax {agree:.0%}",
                f"< {tl:.0e}"),
            row(f"model ({what}) vs HF fp32: loss", loss_rel < tloss,
                f"{loss:.5f} vs {float(ref.loss):.5f} (rel {loss_rel:.1e})", f"< {tloss:.0e}")]


def _attention_inputs(device, dtype, causal):
    """q [T, 1, H, D], k/v [T, 1, G, D] and cu_seqlens with a trailing padding segment."""
    import torch

    gen = torch.Generator().manual_seed(3 if causal else 4)
    if device.type == "cuda":  # Qwen2-VL-2B's LLM / ViT heads, a 4096-token row
        heads, groups, dim = (12, 2, 128) if causal else (16, 16, 80)
        bounds, total = [0, 300, 1100, 1164, 2900, 3500], 4096
    else:  # small on the CPU
        heads, groups, dim = (4, 2, 32) if causal else (4, 4, 40)
        bounds, total = [0, 60, 200, 217, 400, 450], 512
    q = torch.randn(total, 1, heads, dim, generator=gen)
    k = torch.randn(total, 1, groups, dim, generator=gen)
    v = torch.randn(total, 1, groups, dim, generator=gen)
    cu = torch.tensor(bounds + [total], dtype=torch.int32)
    return [t.to(device, dtype) for t in (q, k, v)], cu.to(device), (heads, groups, dim)


def _core_attention(backend, shape, causal):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from mindspeed_mm.platform.attention import CoreAttention

    heads, groups, dim = shape
    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=dim, attention_dropout=0.0)
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    return CoreAttention(config, 1, mask, backend=backend).eval()


def _reference_attention(q, k, v, cu, causal):
    """Per segment, plain softmax(QK^T / sqrt(d)) V in fp64 on the CPU: [T, 1, H * D]."""
    import torch

    q, k, v, cu = q.double().cpu(), k.double().cpu(), v.double().cpu(), cu.cpu().tolist()
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    out = torch.empty_like(q)
    for s, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (t[s:e, 0].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        scores = qs @ ks.transpose(1, 2) / q.shape[-1] ** 0.5
        if causal:
            n = e - s
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[s:e, 0] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out.reshape(q.shape[0], 1, -1)


def _torch_varlen(q, k, v, cu, causal):
    """torch's own varlen flash kernel (torch.nn.attention.varlen), GQA expanded: [T, 1, H * D]."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    n = int((cu[1:] - cu[:-1]).max())
    params = inspect.signature(varlen_attn).parameters
    kw = {"is_causal": causal} if "is_causal" in params else {"window_size": (-1, 0) if causal else (-1, -1)}
    out = varlen_attn(q[:, 0], k[:, 0], v[:, 0], cu, cu, n, n, **kw)
    return out.reshape(q.shape[0], 1, -1)


def check_attention(device, dtype, gpu):
    import importlib.util

    import torch
    from megatron.core.packed_seq_params import PackedSeqParams

    tol = TOL["attention"][not gpu]
    has_flash = importlib.util.find_spec("flash_attn") is not None
    rows = []
    for causal, label in ((True, "causal GQA (LLM)"), (False, "bidirectional (ViT)")):
        (q, k, v), cu, shape = _attention_inputs(device, dtype, causal)
        params = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        ref = _reference_attention(q, k, v, cu, causal)
        with torch.no_grad():
            sdpa = _core_attention("sdpa", shape, causal)(q, k, v, None, packed_seq_params=params)
        err = rel(sdpa.cpu(), ref)
        rows.append(row(f"SDPA varlen ({label}) vs per-sample fp64", err < tol, f"rel {err:.1e}", f"< {tol:.0e}"))
        if not gpu:
            continue
        if has_flash:
            with torch.no_grad():
                flash = _core_attention("flash", shape, causal)(q, k, v, None, packed_seq_params=params)
            err, err_ref = rel(flash.float(), sdpa.float()), rel(flash.cpu(), ref)
            rows.append(row(f"flash-attn varlen == SDPA ({label})", err < tol,
                            f"rel {err:.1e} (vs fp64 {err_ref:.1e})", f"< {tol:.0e}"))
            continue
        rows.append(row(f"flash-attn varlen == SDPA ({label})", None, "flash-attn not installed",
                        "no binary wheel on PyPI; see device_check_wheels.sh"))
        try:
            with torch.no_grad():
                tv = _torch_varlen(q, k, v, cu, causal)
            err = rel(tv.float(), sdpa.float())
            rows.append(row(f"torch varlen flash kernel == SDPA ({label})", err < tol, f"rel {err:.1e}",
                            f"< {tol:.0e} (stand-in)"))
        except Exception as exc:  # an older torch without it, or a kernel refusing the shape
            rows.append(row(f"torch varlen flash kernel == SDPA ({label})", None, one_line(exc), "stand-in"))
    return rows


def _sample_of(batch, b, cfg):
    """Sample b of a padded batch as the dataset yields it (its own positions, its own images)."""
    import torch

    from mindspeed_mm.models.rope_index import get_rope_index

    n = int(batch["attention_mask"][b].sum())
    ids = batch["input_ids"][b, :n]
    grids = batch["image_grid_thw"]
    counts = [int((batch["input_ids"][i] == cfg.image_token_id).sum()) for i in range(batch["input_ids"].shape[0])]
    merge = cfg.vision.spatial_merge_size ** 2
    tokens_per_image = (grids.prod(-1) // merge).tolist()
    first = 0  # index of this sample's first image: images are listed sample by sample
    for i in range(b):
        got = 0
        while got < counts[i]:
            got += tokens_per_image[first]
            first += 1
    mine, got = [], 0
    while got < counts[b]:
        got += tokens_per_image[first + len(mine)]
        mine.append(first + len(mine))
    grid = grids[mine] if mine else None
    pixels = None
    if mine:
        offsets = [0, *grids.prod(-1).cumsum(0).tolist()]
        pixels = batch["pixel_values"][offsets[mine[0]]:offsets[mine[-1] + 1]]
    pos, _ = get_rope_index(ids[None], grid, None, spatial_merge_size=cfg.vision.spatial_merge_size,
                            image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
    return {"input_ids": ids, "labels": batch["labels"][b, :n], "mm_token_type_ids": batch["mm_token_type_ids"][b, :n],
            "position_ids": pos[:, 0], "pixel_values": pixels, "image_grid_thw": grid}


def check_packed(model, device, dtype, gpu):
    import torch

    from tests.hf_reference import PAD_ID, VOCAB, make_batch, shift_labels

    ok, why = packing_available()
    if not ok:
        return [row("packed == unpacked (logits, loss)", None, why, "enable when packing lands")]
    from mindspeed_mm.data.collate import PackedCollator

    from tests.test_model_tp1 import batch_position_ids

    cfg = model.cfg
    batch = make_batch("right")
    samples = [_sample_of(batch, b, cfg) for b in range(2)]
    real = sum(len(s["input_ids"]) for s in samples)
    packed = PackedCollator(PAD_ID, min_length=real + 7)(samples)  # 7 tokens of padding: a segment of its own
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    with torch.no_grad():
        pos = batch_position_ids(batch, model)
        un_args = [to(batch["input_ids"]), to(pos), to(batch["attention_mask"]),
                   batch["pixel_values"].to(device, dtype), to(batch["image_grid_thw"])]
        pk_args = [to(packed["input_ids"]), to(packed["position_ids"]), to(packed["attention_mask"]),
                   packed["pixel_values"].to(device, dtype), to(packed["image_grid_thw"])]
        cu = to(packed["cu_seqlens"])
        un_logits = model(*un_args)[..., :VOCAB].float().cpu()
        pk_logits = model(*pk_args, cu_seqlens=cu)[..., :VOCAB].float().cpu()
        un_loss = float(model(*un_args, labels=to(shift_labels(batch["labels"]))).sum())
        pk_loss = float(model(*pk_args, labels=to(shift_labels(packed["labels"])), cu_seqlens=cu).sum())
    bounds = packed["cu_seqlens"].tolist()
    errs = []
    for b in range(2):
        n = bounds[b + 1] - bounds[b]
        errs.append(rel(pk_logits[0, bounds[b]:bounds[b + 1]], un_logits[b, :n]))
    err, loss_rel = max(errs), abs(pk_loss - un_loss) / abs(un_loss)
    tl, tloss = TOL["packed_logits"][not gpu], TOL["packed_loss"][not gpu]
    return [row("packed == unpacked: logits of each sample", err < tl,
                f"rel {err:.1e} ({len(bounds) - 1} segments)", f"< {tl:.0e}"),
            row("packed == unpacked: summed loss", loss_rel < tloss, f"rel {loss_rel:.1e}", f"< {tloss:.0e}")]


def stage_tests(gpu):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cuda" if gpu else "cpu")
    import torch

    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from tests.hf_reference import build_our_model, hf_model, our_config

    os.environ["MASTER_PORT"] = free_port()
    init_distributed(platform, 1, 1, seed=1)
    device = platform.device(0)
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = []
    hf = hf_model()  # fp32, CPU: the reference
    model = build_our_model(hf, our_config(hf.config, dtype="bf16" if gpu else "fp32")).to(device).eval()
    for name, fn in (("model vs HF", lambda: check_model_vs_hf(hf, model, device, dtype, gpu)),
                     ("attention", lambda: check_attention(device, dtype, gpu)),
                     ("packed == unpacked", lambda: check_packed(model, device, dtype, gpu))):
        try:
            rows += fn()
        except Exception as exc:
            rows.append(row(name, False, one_line(exc), "raised"))
    destroy_distributed()
    return rows


# ---------------------------------------------------------------- stage "mfu"

def draw_samples(cfg, count, max_tokens, image_px, text_mean, seed=0):
    """LLaVA-like samples: text, one image (image_px range, patch-merge aligned), an answer; own positions."""
    import torch

    from mindspeed_mm.models.rope_index import get_rope_index

    v = cfg.vision
    gen = torch.Generator().manual_seed(seed)
    top = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    unit = v.patch_size * v.spatial_merge_size
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    samples = []
    while len(samples) < count:
        h, w = (int(torch.randint(image_px[0] // unit, image_px[1] // unit + 1, (1,), generator=gen))
                * v.spatial_merge_size for _ in range(2))
        image = h * w // v.spatial_merge_size ** 2
        text = int(min(max_tokens, 8 + (-text_mean * torch.rand(1, generator=gen).log()).item()))  # long tail
        prompt = max(4, text // 3)
        n = prompt + image + 2 + (text - prompt)
        if n > max_tokens:
            continue
        ids = torch.randint(0, top, (n,), generator=gen)
        ids[prompt] = cfg.vision_start_token_id
        ids[prompt + 1:prompt + 1 + image] = cfg.image_token_id
        ids[prompt + 1 + image] = cfg.vision_end_token_id
        labels = torch.full_like(ids, -100)
        labels[prompt + 2 + image:] = ids[prompt + 2 + image:]
        grid = torch.tensor([[1, h, w]])
        pos, _ = get_rope_index(ids[None], grid, None, spatial_merge_size=v.spatial_merge_size,
                                image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
        samples.append({"input_ids": ids, "labels": labels, "mm_token_type_ids": (ids == cfg.image_token_id).long(),
                        "position_ids": pos[:, 0], "pixel_values": torch.randn(h * w, patch_dim, generator=gen),
                        "image_grid_thw": grid})
    return samples


def make_packs(samples, max_tokens, count):
    """First fit in drawing order: `count` packs of at most max_tokens real tokens."""
    packs, current, used = [], [], 0
    for s in samples:
        n = len(s["input_ids"])
        if used + n > max_tokens:
            packs.append(current)
            current, used = [], 0
            if len(packs) == count:
                break
        current.append(s)
        used += n
    return packs


def stage_mfu(gpu, args):
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cuda" if gpu else "cpu")
    import statistics

    import torch

    from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.training.flops import BatchShape, train_flops
    from mindspeed_mm.training.step import train_step
    from scripts.bench_train import build_ours, training_flags

    ok, why = packing_available()
    label = f"MFU, {'2B-shaped' if gpu else 'tiny'} model packed to {args.max_tokens} tokens"
    if not ok:
        return [row(label, None, why, "enable when packing lands")]
    from mindspeed_mm.data.collate import PackedCollator

    os.environ["MASTER_PORT"] = free_port()
    init_distributed(platform, 1, 1, seed=0)
    device = platform.device(0)
    precision = "bf16" if gpu else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        if gpu:
            model_json = args.model_json
        else:  # the reference's tiny architecture as a model file
            from tests.hf_reference import our_config

            model_json = os.path.join(tmp, "model.json")
            our_config(dtype="fp32").save(model_json)
        cfg = Qwen2VLConfig.load(model_json)
        build_start = time.perf_counter()
        train_args, model, optimizer, scheduler = build_ours(training_flags(model_json, 1, 1e-5, precision), cfg)
        build_s = time.perf_counter() - build_start
    px, text_mean = ((224, 672), 400) if gpu else ((56, 112), 40)
    packs = make_packs(draw_samples(cfg, 400, args.max_tokens, px, text_mean), args.max_tokens, 4)
    pad_id = 0
    collate = PackedCollator(pad_id, min_length=args.max_tokens)  # every row exactly max_tokens long
    batches = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in collate(p).items()} for p in packs]
    vocab = cfg.text.padded_vocab_size(1)
    flops = [train_flops(cfg, BatchShape.of(b), vocab) for b in batches]
    real = [int(b["attention_mask"].sum()) for b in batches]
    samples_per_pack = statistics.mean(len(p) for p in packs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, losses, done_flops, done_tokens = [], [], 0, 0
    for i in range(args.iters):
        j = i % len(batches)
        sync()
        start = time.perf_counter()
        result = train_step(model, optimizer, scheduler, [batches[j]], train_args, iteration=i + 1)
        sync()
        took = time.perf_counter() - start
        losses.append(result.loss)
        if i >= args.warmup:
            times.append(took)
            done_flops += flops[j]
            done_tokens += real[j]
        print(f"mfu: iteration {i + 1}/{args.iters} {took * 1000:.1f} ms loss {result.loss:.4f}", flush=True)
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    params = sum(p.numel() for p in model.parameters())
    destroy_distributed()
    total = sum(times)
    achieved = done_flops / total / 1e12
    tokens_s = done_tokens / total
    efficiency = sum(real) / (len(real) * args.max_tokens)
    finite = all(x == x and abs(x) != float("inf") for x in losses)
    setup = (f"{os.path.basename(model_json) if gpu else 'tiny model.json'} ({params / 1e9:.2f}B params, random), "
             f"{precision}, {len(batches)} packs of {samples_per_pack:.1f} samples, packing {efficiency:.1%}, "
             f"build {build_s:.0f} s" + (f", peak mem {memory:.1f} GiB" if gpu else ""))
    rows = [row("training loop (setup)", finite, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}", setup)]
    timing = (f"{len(times)} timed of {args.iters} iterations, median {statistics.median(times) * 1000:.1f} ms, "
              f"{done_flops / len(times) / 1e12:.2f} TFLOP/iteration")
    if gpu:
        peak = args.peak_tflops
        rows.append(row(label, "info", f"{achieved / peak:.1%} ({achieved:.1f} TFLOP/s)",
                        f"of {peak:.1f} TFLOP/s bf16 dense spec (= {achieved / MEASURED_PEAK_TFLOPS:.1%} of "
                        f"{MEASURED_PEAK_TFLOPS:.0f} measured); {timing}"))
    else:
        rows.append(row(label, "info", f"{achieved * 1000:.2f} GFLOP/s", f"CPU fp32: no MFU; {timing}"))
    rows.append(row("tokens/s per GPU" if gpu else "tokens/s (CPU)", "info", f"{tokens_s:.0f}",
                    "real tokens (padding left out) / timed seconds"))
    return rows


# ---------------------------------------------------------------- driver

def one_line(exc) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def launch_rows(gpu):
    """Would the device call start: the wrapper parses, the run command fits, the tree and wheels fit."""
    rows = []
    sh = os.path.join(ROOT, "scripts", "device_check.sh")
    parses = subprocess.run(["bash", "-n", sh], capture_output=True, text=True).returncode == 0
    rows.append(row("wrapper scripts/device_check.sh parses", parses, "bash -n", ""))
    rows.append(row("run command under 2000 characters", len(RUN_COMMAND) < 2000, f"{len(RUN_COMMAND)} chars", "< 2000"))
    whl = os.path.join(ROOT, ".whl")
    wheels = sorted(f for f in os.listdir(whl) if f.endswith(".whl")) if os.path.isdir(whl) else []
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    size = sum(os.path.getsize(os.path.join(ROOT, p)) for p in listed.stdout.decode().split("\0")
               if p and os.path.isfile(os.path.join(ROOT, p)))
    size += sum(os.path.getsize(os.path.join(whl, f)) for f in wheels)
    rows.append(row("working tree + .whl under 64 MiB", size < 64 * 2 ** 20, f"{size / 2 ** 20:.1f} MiB", "< 64 MiB"))
    has_mcore = any(f.startswith("megatron_core-") for f in wheels)
    if not gpu:
        rows.append(row(".whl/ holds megatron-core for the device", True if has_mcore else None,
                        ", ".join(wheels) or "no .whl/", "" if has_mcore else "run scripts/device_check_wheels.sh first"))
    return rows


def versions(gpu):
    import importlib.metadata as md

    import torch

    def ver(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    device = torch.cuda.get_device_name(0) if gpu else "CPU (dry run)"
    return (f"{device}; torch {torch.__version__}, megatron-core {ver('megatron-core')}, "
            f"transformers {ver('transformers')}, flash-attn {ver('flash-attn')}")


def run_stage(stage, gpu, args):
    """The stage in a child process: (rows, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--result", out,
               "--iters", str(args.iters), "--warmup", str(args.warmup), "--max-tokens", str(args.max_tokens),
               "--model-json", args.model_json, "--peak-tflops", str(args.peak_tflops)]
        if not gpu:
            cmd.append("--dry-run")
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=STAGE_TIMEOUT[stage], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
            log = proc.stdout
        except subprocess.TimeoutExpired as exc:
            log = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            proc = None
        took = time.perf_counter() - start
        if args.log_dir:
            with open(os.path.join(args.log_dir, f"device_check_{stage}.log"), "w") as f:
                f.write(log)
        if os.path.exists(out):
            with open(out) as f:
                return json.load(f), took
    last = [line for line in log.strip().splitlines() if line.strip()][-1:] or ["no output"]
    why = f"timed out after {STAGE_TIMEOUT[stage]} s" if proc is None else f"exit {proc.returncode}: {last[0][:140]}"
    return [row(f"stage '{stage}'", False, why, "see its log")], took


def print_table(title, rows):
    cols = ("check", "result", "measured", "bound")
    heads = ("check", "result", "measured", "bound / note")
    widths = [max(len(h), *(len(str(r[c])) for r in rows)) for c, h in zip(cols, heads)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    print("=" * len(line))
    print(title)
    print(line)
    print("| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |")
    print(line)
    for r in rows:
        print("| " + " | ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)) + " |")
    print(line)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, fp32, sdpa only, tiny MFU loop (checks it would start)")
    ap.add_argument("--iters", type=int, help="MFU iterations (default 20; dry run 2)")
    ap.add_argument("--warmup", type=int, help="of --iters, not timed (default 3; dry run 1)")
    ap.add_argument("--max-tokens", type=int, help="pack size (default 4096; dry run 256)")
    ap.add_argument("--model-json", default=os.path.join(ROOT, "examples/qwen2vl/model_2b.json"))
    ap.add_argument("--peak-tflops", type=float, default=SPEC_PEAK_TFLOPS, help="the MFU's denominator")
    ap.add_argument("--log-dir", default=os.environ.get("OUT"), help="stage logs go here (default $OUT)")
    ap.add_argument("--stage", choices=("tests", "mfu"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gpu = not args.dry_run
    args.iters = args.iters or (20 if gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.max_tokens = args.max_tokens or (4096 if gpu else 256)
    if args.warmup >= args.iters:
        print(f"error: --warmup {args.warmup} leaves no timed iteration of --iters {args.iters}", file=sys.stderr)
        return 2

    if args.stage:  # child process
        rows = stage_tests(gpu) if args.stage == "tests" else stage_mfu(gpu, args)
        with open(args.result, "w") as f:
            json.dump(rows, f)
        return 0

    start = time.perf_counter()
    try:
        import torch
    except ImportError as exc:
        print(f"error: {exc}: install torch first", file=sys.stderr)
        return 2
    if gpu and not torch.cuda.is_available():
        print("error: no CUDA GPU here (torch.cuda.is_available() is False); use --dry-run on a CPU", file=sys.stderr)
        return 2
    try:
        import megatron.core  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"error: {exc} (on the device machine, bring it as a wheel: scripts/device_check_wheels.sh)",
              file=sys.stderr)
        return 2
    title = f"device check{' (dry run)' if not gpu else ''}: {versions(gpu)}"
    rows = launch_rows(gpu)
    for stage in ("tests", "mfu"):
        stage_rows, took = run_stage(stage, gpu, args)
        print(f"stage {stage}: {took:.0f} s", flush=True)
        rows += stage_rows
    title += f"; {time.perf_counter() - start:.0f} s"
    print_table(title, rows)
    failed = [r for r in rows if r["result"] == "FAIL"]
    print(f"{len(rows) - len(failed)} rows without failure, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
