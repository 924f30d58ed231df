"""All benchmarks side by side, in one process tree, printed as one table (and JSON).

    python scripts/benchmark.py [--json logs/benchmark.json] [--only train decode ...]

Runs, each in a child process with ``--json``, every comparison the project
makes against its reference, measured in the same run:

  train       training step: ours (the pretrain_qwen2vl.py stack) vs HF Qwen2-VL + torch AdamW, CPU fp32
  packing     LLaVA-like samples: ours packed / unpacked vs HF padded batches of 4 and batch 1 (samples/s)
  launcher    finetune_qwen2vl_2b.sh end to end (data.json defaults, data included) vs HF's step, tiny model
  lora        LoRA vs full fine-tuning: step time, peak memory, gradient + optimizer bytes
  decode      KV-cached greedy decoding vs HF generate (the tiny model, batch 1; -wide: LLM 4 x 512, batch 8)
  preprocess  the data pipeline vs HF's Qwen2-VL processing
  convert     HF -> Megatron conversion of 2B-shaped weights vs cp -r, its peak RSS vs its largest file,
              and the export back to HF
  gpu         2B-shaped training at seq 4096 on one GPU: TFLOP/s vs the GPU's peak (MFU); skipped without a GPU

Every row reads ours / reference in the row's unit; 'better' says which way is good.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.bench_report import format_table, write_rows  # noqa: E402

BENCHMARKS = {
    "train": ["scripts/bench_train.py"],
    "packing": ["scripts/bench_packing.py"],
    "launcher": ["scripts/bench_launcher.py"],
    "lora": ["scripts/bench_lora.py"],
    "decode": ["scripts/bench_decode.py"],
    "decode-wide": ["scripts/bench_decode.py", "--hidden-size", "512", "--num-layers", "4", "--batch-size", "8"],
    "preprocess": ["scripts/bench_preprocess.py"],
    "convert": ["scripts/bench_convert.py", "--export"],
    "gpu": ["scripts/bench_gpu.py"],
}


def run_one(name: str, folder: str) -> dict:
    """Run one benchmark script (its output goes to the terminal); return its JSON or the failure."""
    out = os.path.join(folder, f"{name}.json")
    cmd = [sys.executable, os.path.join(ROOT, BENCHMARKS[name][0]), *BENCHMARKS[name][1:], "--json", out]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print(f"\n==== {name}: {' '.join(cmd[1:-2])}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    seconds = time.time() - start
    if proc.returncode != 0 or not os.path.isfile(out):
        return {"name": name, "seconds": seconds, "setup": f"FAILED (exit code {proc.returncode})", "rows": []}
    with open(out) as f:
        result = json.load(f)
    return {"name": name, "seconds": seconds, **result}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    ap.add_argument("--json", default=os.path.join(ROOT, "logs", "benchmark.json"))
    args = ap.parse_args(argv)

    names = args.only or list(BENCHMARKS)
    with tempfile.TemporaryDirectory() as folder:
        results = [run_one(name, folder) for name in names]
    rows = []
    for result in results:
        for r in result["rows"]:
            if any(r["benchmark"] == seen["benchmark"] for seen in rows):
                r = dict(r, benchmark=f"{r['benchmark']} ({result['name']})")
            rows.append(r)
    print("\n" + "=" * 100)
    for result in results:
        print(f"{result['name']:12s} ({result['seconds']:4.0f}s): {result['setup']}")
    print()
    print(format_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_rows(args.json, {r["name"]: r["setup"] for r in results}, rows)
    print(f"\nwritten to {args.json}")
    failed = [r["name"] for r in results if r["setup"].startswith("FAILED")]
    if failed:
        print(f"error: {', '.join(failed)} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
