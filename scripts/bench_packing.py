"""Training throughput on LLaVA-like data: ours packed / unpacked next to HF padded batches of 4 and batch 1.

    python scripts/bench_packing.py [--samples 96] [--global-batch 16] [--max-tokens 4096] [--json out.json]

Same samples (scripts/make_llava_like.py: drawn 224-672 px images, 1-3 turns, long-tailed lengths, mean
near 600 tokens at min/max pixels 56x56 / 448x448), same random weights (bench_train.py's model, HF ->
ours through the project's mapping), fp32, one gloo process.  Every row trains on the same samples in
global batches of about ``--global-batch`` samples (one optimizer step each):

  ours packed    the training step of pretrain_qwen2vl.py (mindspeed_mm/training build + train_step:
                 megatron DDP, distributed optimizer, pipeline schedule, per-token loss, clipping) on
                 micro-batches that are packs of mindspeed_mm/data/packing.py's plan_packs (first-fit
                 decreasing, at most --max-tokens tokens) collated by PackedCollator (one row + cu_seqlens)
  ours unpacked  the same step, micro-batch 1 (one sample per micro-batch, no padding)
  HF padded-4    Qwen2VLForConditionalGeneration + torch AdamW + clip_grad_norm_, micro-batches of 4
                 right-padded to their longest (LLaMA-Factory's default), gradients accumulated
  HF batch 1     the same with micro-batch 1

Batches are collated before timing (data loading is not in these rows).
Global batches are interleaved (ours packed, ours unpacked, HF padded-4, HF batch 1, then the next
batch), so all rows see the same machine load; samples/s and tokens/s (real tokens) are over the whole
epoch after one untimed warm-up global batch per row.  Packing efficiency = real tokens / (packs x
max_tokens).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scripts.bench_train import add_model_args, build_same_weights, timed, training_flags  # noqa: E402
from scripts.make_llava_like import MAX_PIXELS, MIN_PIXELS, make_llava_like, token_lengths  # noqa: E402


def _chunks(seq, n):
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def compute_rows(args) -> dict:
    """Run the four rows interleaved; returns the figures."""
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import torch
    from transformers import AutoTokenizer

    from mindspeed_mm.data.collate import PackedCollator, Qwen2VLCollator
    from mindspeed_mm.data.packing import plan_packs
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.training.step import train_step
    from scripts.make_tiny_qwen2vl import make_tiny_qwen2vl

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_PORT", "29521")
    init_distributed(platform, 1, 1, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        proc = os.path.join(folder, "processor")
        make_tiny_qwen2vl(proc, with_model=False, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        tokenizer = AutoTokenizer.from_pretrained(proc)
        data = make_llava_like(os.path.join(folder, "data"), args.samples, args.seed)
        dataset, lengths, patches = token_lengths(data, proc, os.path.join(folder, "cache"),
                                                  cutoff_len=args.max_tokens)
        samples = [dataset[i] for i in range(len(dataset))]
        gb = args.global_batch
        flags = lambda model_json: training_flags(model_json, 1, args.lr, extra=["--global-batch-size", str(gb)])  # noqa: E731
        hf, train_args, model, optimizer, scheduler = build_same_weights(folder, tokenizer, args, flags)
    pad = dataset.pad_token_id
    order = list(range(len(samples)))  # the records are already in random order; all rows use it
    plan = plan_packs(lengths, patches, args.max_tokens, seed=args.seed, window=args.window)
    per_pack = plan.samples / max(1, len(plan.packs))
    packs_per_step = max(1, round(gb / per_pack))
    packed = PackedCollator(pad)
    padded = Qwen2VLCollator(pad)
    hf_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "labels")
    steps = {
        "ours packed": [[packed([samples[i] for i in p]) for p in group]
                        for group in _chunks(plan.packs, packs_per_step)],
        "ours unpacked": [[padded([samples[i]]) for i in group] for group in _chunks(order, gb)],
        "HF padded-4": [[{k: b[k] for k in hf_keys} for b in (padded([samples[i] for i in mb])
                                                               for mb in _chunks(group, 4))]
                        for group in _chunks(order, gb)],
        "HF batch 1": [[{k: padded([samples[i]])[k] for k in hf_keys} for i in group] for group in _chunks(order, gb)],
    }
    count = lambda mbs: sum(int(b["attention_mask"].sum()) for b in mbs)  # noqa: E731
    nsamples = {"ours packed": [sum(len(p) for p in g) for g in _chunks(plan.packs, packs_per_step)]}
    for name in ("ours unpacked", "HF padded-4", "HF batch 1"):
        nsamples[name] = [len(g) for g in _chunks(order, gb)]
    ntokens = {name: [count(mbs) for mbs in batches] for name, batches in steps.items()}
    capacity = {name: [sum(b["input_ids"].numel() for b in mbs) for mbs in batches] for name, batches in steps.items()}

    hf_opt = torch.optim.AdamW(hf.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    iterations = itertools.count(1)

    def ours(mbs):
        return train_step(model, optimizer, scheduler, mbs, train_args, iteration=next(iterations)).loss

    def hf_step(mbs):
        hf_opt.zero_grad(set_to_none=True)
        total = 0.0
        for b in mbs:
            loss = hf(**b, use_cache=False).loss / len(mbs)
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        return total

    run = {"ours packed": ours, "ours unpacked": ours, "HF padded-4": hf_step, "HF batch 1": hf_step}
    times = {name: [] for name in steps}
    rounds = max(len(v) for v in steps.values())
    for r in range(-1, rounds):  # r = -1: warm-up on the first global batch, untimed
        for name, fn in run.items():
            k = 0 if r < 0 else r
            if k >= len(steps[name]):
                continue
            took, _ = timed(lambda: fn(steps[name][k]))
            if r >= 0:
                times[name].append(took)
        if args.steps and r + 1 >= args.steps:
            break
    destroy_distributed()
    rows = {}
    for name in steps:
        n = len(times[name])
        secs = sum(times[name])
        rows[name] = dict(seconds=secs, steps=n, samples=sum(nsamples[name][:n]), tokens=sum(ntokens[name][:n]),
                          slots=sum(capacity[name][:n]),
                          samples_per_s=sum(nsamples[name][:n]) / secs, tokens_per_s=sum(ntokens[name][:n]) / secs)
    params = sum(p.numel() for p in hf.parameters())
    return dict(rows=rows, efficiency=plan.efficiency, packs=len(plan.packs), packed_samples=plan.samples,
                dropped=plan.dropped, mean_tokens=float(lengths.mean()), max_len=int(lengths.max()),
                packs_per_step=packs_per_step, threads=torch.get_num_threads(),
                setup=(f"random Qwen2-VL {params / 1e6:.1f}M parameters (LLM {args.layers} x {args.hidden_size}, "
                       f"ViT {args.vit_layers} x {args.vit_hidden_size}), {len(samples)} LLaVA-like samples, mean "
                       f"{lengths.mean():.0f} tokens (max {lengths.max()}), {patches.mean():.0f} ViT patches, "
                       f"pixels {MIN_PIXELS}..{MAX_PIXELS}, global batch ~{gb} samples, packs <= {args.max_tokens} "
                       f"tokens ({packs_per_step} per step), fp32, CPU, {torch.get_num_threads()} threads"))


def print_compute(res) -> list:
    rows = res["rows"]
    print(res["setup"])
    print(f"packing: {res['packs']} packs of {res['packed_samples']} samples, efficiency (real tokens / capacity) "
          f"{res['efficiency']:.1%}, dropped {res['dropped']}")
    hf4, hf1 = rows["HF padded-4"]["samples_per_s"], rows["HF batch 1"]["samples_per_s"]
    print(f"{'':16s}{'steps':>6s}{'samples':>8s}{'s':>8s}{'samples/s':>11s}{'tokens/s':>10s}{'real/slots':>11s}"
          f"{'/HF pad-4':>10s}{'/HF bs1':>9s}")
    for name, r in rows.items():
        print(f"{name:16s}{r['steps']:6d}{r['samples']:8d}{r['seconds']:8.2f}{r['samples_per_s']:11.2f}"
              f"{r['tokens_per_s']:10.0f}{r['tokens'] / r['slots']:11.1%}{r['samples_per_s'] / hf4:10.2f}"
              f"{r['samples_per_s'] / hf1:9.2f}")
    ours = rows["ours packed"]["samples_per_s"]
    print(f"targets: ours packed / HF padded-4 = {ours / hf4:.2f} (>= 1.5), / HF batch 1 = {ours / hf1:.2f} (>= 1.0), "
          f"packing efficiency {res['efficiency']:.1%} (>= 95%)")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--global-batch", type=int, default=16, help="samples per optimizer step (about, when packed)")
    ap.add_argument("--max-tokens", type=int, default=4096, help="pack capacity (tokens)")
    ap.add_argument("--window", type=int, default=1000, help="packing shuffle window")
    ap.add_argument("--steps", type=int, default=0, help="timed global batches per row (0: the whole epoch)")
    ap.add_argument("--seed", type=int, default=0)
    add_model_args(ap)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    res = compute_rows(args)
    rows = print_compute(res)
    if args.json:
        from scripts.bench_report import row, write_rows

        hf4, hf1 = rows["HF padded-4"], rows["HF batch 1"]
        write_rows(args.json, res["setup"], [
            row("training, LLaVA-like, ours packed vs HF padded-4", "samples/s", "higher",
                rows["ours packed"]["samples_per_s"], hf4["samples_per_s"], "HF Qwen2-VL + AdamW, padded batches of 4",
                f"packing efficiency {res['efficiency']:.1%}"),
            row("training, LLaVA-like, ours packed vs HF batch 1", "samples/s", "higher",
                rows["ours packed"]["samples_per_s"], hf1["samples_per_s"], "HF Qwen2-VL + AdamW, batch 1", ""),
            row("training, LLaVA-like, ours unpacked vs HF batch 1", "samples/s", "higher",
                rows["ours unpacked"]["samples_per_s"], hf1["samples_per_s"], "HF Qwen2-VL + AdamW, batch 1", ""),
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
