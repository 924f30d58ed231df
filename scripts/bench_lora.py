"""LoRA against full fine-tuning: step time and memory of the same model, batch and training stack.

    python scripts/bench_lora.py [--layers 8 --hidden-size 1024 ...] [--lora-rank 8] [--json out.json]

Each mode runs in its own process (so one's memory never counts for the other), alternately, twice:
the training step of pretrain_qwen2vl.py (scripts/bench_train.py's build: megatron DDP, distributed
Adam, fp32 on the CPU) on the same random weights and the same collated batch of drawn conversations
with images.  Reported per mode: the fastest step, the peak resident memory during the training steps
(Linux VmHWM, reset after the build), and the bytes held by trained parameters' gradients and the
optimizer (counted from the objects: the part LoRA removes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.bench_train import add_model_args, build_same_weights, make_batch, timed, training_flags  # noqa: E402


def _peak_rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (VmHWM)
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def child(args) -> dict:
    """One mode, in this process: build, then time the steps."""
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    import gc

    import torch

    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed
    from mindspeed_mm.training.step import train_step

    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["MASTER_PORT"] = str(args.port)
    init_distributed(platform, 1, 1, seed=0)
    lora = ["--lora-rank", str(args.lora_rank), "--lora-alpha", str(2 * args.lora_rank),
            "--load", "unused"] if args.child == "lora" else []
    with tempfile.TemporaryDirectory() as folder:
        tokenizer, batch = make_batch(folder, args.batch_size, 56 * 56, args.max_pixels)
        hf, train_args, model, optimizer, scheduler = build_same_weights(
            folder, tokenizer, args, lambda model_json: training_flags(model_json, args.batch_size, args.lr, extra=lora))
    del hf
    gc.collect()
    trained = [p for p in model.parameters() if p.requires_grad]
    grad_bytes = sum(p.main_grad.numel() * p.main_grad.element_size() for p in trained)
    losses, times = [], []
    _peak_rss_reset()
    for step in range(args.warmup + args.steps):
        took, result = timed(lambda: train_step(model, optimizer, scheduler, [batch], train_args, iteration=step + 1))
        losses.append(result.loss)
        if step >= args.warmup:
            times.append(took)
    state_bytes = sum(t.numel() * t.element_size() for opt in getattr(optimizer, "chained_optimizers", [optimizer])
                      for s in opt.optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    main_bytes = sum(p.numel() * p.element_size() for opt in getattr(optimizer, "chained_optimizers", [optimizer])
                     for g in opt.optimizer.param_groups for p in g["params"])
    out = dict(ms=min(times) * 1000, peak_rss=_peak_rss_bytes(), grad_bytes=grad_bytes, optimizer_bytes=state_bytes,
               main_param_bytes=main_bytes, trained=sum(p.numel() for p in trained),
               total=sum(p.numel() for p in model.parameters()), losses=losses,
               tokens=int(batch["attention_mask"].sum()), threads=torch.get_num_threads())
    destroy_distributed()
    return out


def _run_child(mode: str, argv: list) -> dict:
    from tests.multiproc import free_port

    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", mode, "--child-out", f.name,
               "--port", str(free_port())]
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        with open(f.name) as g:
            return json.load(g)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="full, LoRA, full, LoRA, ...: the best of each")
    ap.add_argument("--batch-size", type=int, default=4)
    add_model_args(ap)
    ap.set_defaults(hidden_size=1024, ffn_hidden_size=2816, layers=8, heads=16, kv_heads=4, vit_hidden_size=512,
                    vit_layers=8, vit_heads=8)
    ap.add_argument("--max-pixels", type=int, default=224 * 224)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--child", choices=("full", "lora"), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=29531, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        with open(args.child_out, "w") as f:
            json.dump(child(args), f)
        return 0

    passed = [x for k in ("steps", "warmup", "batch_size", "hidden_size", "ffn_hidden_size", "layers", "heads",
                          "kv_heads", "vit_hidden_size", "vit_layers", "vit_heads", "max_pixels", "lora_rank", "lr",
                          "threads") if getattr(args, k) is not None
              for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    runs = {"full": [], "lora": []}
    for _ in range(args.rounds):
        for mode in ("full", "lora"):
            runs[mode].append(_run_child(mode, passed))
    best = {m: min(r, key=lambda x: x["ms"]) for m, r in runs.items()}
    peak = {m: min(x["peak_rss"] for x in r) for m, r in runs.items()}
    full, lo = best["full"], best["lora"]
    gib = 2 ** 30
    setup = (f"random Qwen2-VL {full['total'] / 1e6:.0f}M parameters (LLM {args.layers} x {args.hidden_size}, ViT "
             f"{args.vit_layers} x {args.vit_hidden_size}), batch {args.batch_size} samples = {full['tokens']} tokens, "
             f"fp32, CPU, {full['threads']} threads; LoRA rank {args.lora_rank} on the LLM's linears "
             f"({lo['trained']:,} trained parameters, {100 * lo['trained'] / lo['total']:.2f}%); each mode in its own "
             f"process, {args.rounds} rounds alternated, fastest step / lowest peak")
    print(setup)
    print(f"{'':6s}{'ms/step':>10s}{'peak RSS GiB':>14s}{'grads GiB':>11s}{'optimizer GiB':>15s}{'trained':>14s}")
    for m in ("full", "lora"):
        b = best[m]
        print(f"{m:6s}{b['ms']:10.0f}{peak[m] / gib:14.2f}{b['grad_bytes'] / gib:11.3f}"
              f"{(b['optimizer_bytes'] + b['main_param_bytes']) / gib:15.3f}{b['trained']:14,}")
    if args.json:
        from scripts.bench_report import row, write_rows

        write_rows(args.json, setup, [
            row("LoRA step time (rank %d)" % args.lora_rank, "ms/step", "lower", lo["ms"], full["ms"],
                "full fine-tuning, same stack"),
            row("LoRA peak RSS during steps", "GiB", "lower", peak["lora"] / gib, peak["full"] / gib,
                "full fine-tuning, same stack"),
            row("LoRA gradients + optimizer state", "GiB", "lower",
                (lo["grad_bytes"] + lo["optimizer_bytes"] + lo["main_param_bytes"]) / gib,
                (full["grad_bytes"] + full["optimizer_bytes"] + full["main_param_bytes"]) / gib,
                "full fine-tuning, same stack"),
        ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
