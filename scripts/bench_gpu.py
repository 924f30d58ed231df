"""GPU training throughput and MFU of a Qwen2-VL-2B-shaped model (random weights), seq 4096, one GPU.

    python scripts/bench_gpu.py [--iters 20] [--seq-length 4096] [--peak-tflops 989] [--json out.json]

Builds the training stack of pretrain_qwen2vl.py (megatron DDP, distributed
optimizer, bf16) from examples/qwen2vl/model_2b.json with megatron's random
initialisation, and trains it on one sample of exactly --seq-length tokens:
one --image-size image (its merged patches inside the sequence) and random
text, the answer half supervised.  MFU = model FLOPs per iteration
(mindspeed_mm/training/flops.py: matrix multiplies of ViT, projector and LLM,
attention on the real lengths, backward 2x forward, recomputation not
counted) / median iteration time / the GPU's dense bf16 peak.

Without a GPU it prints why and exits 0 (``--allow-cpu`` runs it on the CPU
anyway, for a smoke test with a small ``--model-json``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mindspeed_mm.constants import IGNORE_INDEX  # noqa: E402  (after the path setup)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("A10", 125.0),
                    ("L4", 121.0))


def peak_tflops(device_name: str):
    for fragment, peak in PEAK_BF16_TFLOPS:
        if fragment in device_name:
            return peak
    return None


def make_sample(cfg, seq_length: int, image_size: int, device, dtype):
    """One micro-batch of exactly seq_length real tokens: text, one image, text; the second half supervised."""
    import torch

    from mindspeed_mm.models.rope_index import get_rope_index

    v = cfg.vision
    side = image_size // v.patch_size // v.spatial_merge_size * v.spatial_merge_size  # patches per side
    grid = torch.tensor([[1, side, side]])
    image_tokens = side * side // v.spatial_merge_size ** 2
    prefix = 16
    if prefix + image_tokens + 2 >= seq_length:
        raise SystemExit(f"error: --seq-length {seq_length} is too short for a {image_size}px image")
    gen = torch.Generator().manual_seed(0)
    first_vision_id = min(cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    text = torch.randint(0, first_vision_id, (seq_length,), generator=gen)  # no stray vision tokens
    ids = text.clone()
    ids[prefix] = cfg.vision_start_token_id
    ids[prefix + 1:prefix + 1 + image_tokens] = cfg.image_token_id
    ids[prefix + 1 + image_tokens] = cfg.vision_end_token_id
    ids = ids[None]
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, seq_length // 2:] = ids[:, seq_length // 2:]
    mask = torch.ones_like(ids)
    position_ids, _ = get_rope_index(ids, grid, mask, spatial_merge_size=v.spatial_merge_size,
                                     image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                                     vision_start_token_id=cfg.vision_start_token_id)
    patch_dim = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    pixels = torch.randn(side * side, patch_dim, generator=gen)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": position_ids,
             "pixel_values": pixels.to(dtype), "image_grid_thw": grid}
    return {k: t.to(device) for k, t in batch.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-json", default=os.path.join(ROOT, "examples/qwen2vl/model_2b.json"))
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--image-size", type=int, default=448, help="pixels per side of the sample's image")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="of the --iters, not timed")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    ap.add_argument("--recompute", action="store_true", help="--recompute-granularity full (uniform, 1 layer)")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak (default: looked up by name)")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU too (smoke test)")
    ap.add_argument("--json", help="also write the figures here (scripts/bench_report.py rows)")
    args = ap.parse_args(argv)

    from scripts.bench_report import row, write_rows

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        reason = "skipped: no NVIDIA GPU here (torch.cuda.is_available() is False)"
        print(reason)
        if args.json:
            write_rows(args.json, reason, [])
        return 0

    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cuda" if torch.cuda.is_available() else "cpu")
    from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.training.flops import BatchShape, train_flops
    from mindspeed_mm.constants import torch_dtype
    from mindspeed_mm.training.step import train_step
    from scripts.bench_train import build_ours, training_flags

    os.environ.setdefault("MASTER_PORT", "29521")
    init_distributed(platform, 1, 1, seed=0)
    cfg = Qwen2VLConfig.load(args.model_json)
    extra = ["--recompute-granularity", "full"] if args.recompute else []
    train_args, model, optimizer, scheduler = build_ours(
        training_flags(args.model_json, 1, 1e-5, args.precision, extra), cfg)
    device = platform.device(0)
    batch = make_sample(cfg, args.seq_length, args.image_size, device, torch_dtype(args.precision))
    flops = train_flops(cfg, BatchShape.of(batch), cfg.text.padded_vocab_size(1))
    times, losses = [], []
    for i in range(args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = train_step(model, optimizer, scheduler, [batch], train_args, iteration=i + 1).loss
        if device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - start
        losses.append(loss)
        if i >= args.warmup:
            times.append(took)
        print(f"iteration {i + 1:3d}/{args.iters}: {took * 1000:8.1f} ms, loss {loss:.4f}", flush=True)
    memory = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    destroy_distributed()

    step = statistics.median(times)
    achieved = flops / step / 1e12
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if args.precision == "bf16" else None)
    params = sum(p.numel() for p in model.parameters())
    setup = (f"{os.path.basename(args.model_json)} ({params / 1e9:.2f}B parameters, random), 1 sample of "
             f"{args.seq_length} tokens with a {args.image_size}px image, {args.precision}, "
             f"{'full recompute, ' if args.recompute else ''}{name}, peak memory {memory:.1f} GiB")
    print(setup)
    mfu = f"MFU {achieved / peak:.1%} of {peak:.0f} TFLOP/s" if peak else "MFU: unknown peak (give --peak-tflops)"
    print(f"median iteration {step * 1000:.1f} ms over {len(times)} timed iterations, {flops / 1e12:.1f} TFLOP "
          f"per iteration -> {achieved:.1f} TFLOP/s, {mfu}; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    if args.json:
        rows = [row(f"GPU training, {os.path.basename(args.model_json)}, seq {args.seq_length}", "TFLOP/s", "higher", achieved, peak,
                    f"dense {args.precision} peak of the {name} (ours/ref = MFU)",
                    f"{step * 1000:.0f} ms/iteration, loss {losses[0]:.2f} -> {losses[-1]:.2f}")] if peak else []
        write_rows(args.json, setup, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
