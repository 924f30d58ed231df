"""Conversion and export, end to end as a user runs them, next to `cp -r` of the same folder.

    python scripts/bench_convert.py --export            # guide split at TP 1 and TP 2, and the export of each
    python scripts/bench_convert.py --layouts "1:0" "2:0 0 10 20" --export

Generates Qwen2-VL-2B-shaped random bf16 weights (~4.4 GB, two safetensors shards
and the hub's flat config.json) into a temporary folder, deleted at the end.  Each
measurement is the whole command in a fresh process (bash examples/qwen2vl/modelconvert.sh
for HF -> ours, python examples/qwen2vl/qwen2vl_convert_to_hf.py for the export; Python and
torch start-up included), against `cp -r` of that command's input folder, both with the
input in the page cache (one untimed run first), the output removed and `sync`ed before
each run; the best of --repeat runs is kept.  Peak memory is the command's own peak RSS
(wait4's ru_maxrss; this parent never imports torch, so nothing big is inherited),
against the largest file it writes.  Targets (issue 13): <= 1.5x `cp -r`, peak RSS < 2.5x
the largest file written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def hub_config(cfg) -> dict:
    """The hub's original (flat) config.json for our model config."""
    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": t.hidden_size, "intermediate_size": t.ffn_hidden_size, "num_hidden_layers": t.num_layers,
        "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_query_groups,
        "vocab_size": t.vocab_size, "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.normalization_epsilon, "rope_theta": t.rope_theta,
        "rope_scaling": {"type": "mrope", "mrope_section": t.mrope_section},
        "tie_word_embeddings": t.tie_word_embeddings, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "image_token_id": cfg.image_token_id, "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
        "vision_config": {"depth": v.num_layers, "embed_dim": v.hidden_size, "hidden_size": v.out_hidden_size,
                          "num_heads": v.num_attention_heads, "mlp_ratio": v.ffn_hidden_size / v.hidden_size,
                          "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
                          "temporal_patch_size": v.temporal_patch_size, "in_chans": v.in_channels,
                          "hidden_act": v.activation_func},
    }


def make_random_hf(folder: str, model_json: str, shard_bytes: int = 4 * 10 ** 9) -> int:
    """Random bf16 weights in hub layout, sharded like the hub; returns the bytes written."""
    import torch
    from safetensors.torch import save_file

    from mindspeed_mm.models.qwen2vl import QWEN2VL
    from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig

    cfg = Qwen2VLConfig.load(model_json)
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hub_config(cfg), f, indent=2)
    shapes = QWEN2VL.mapping.hf_shapes(cfg)
    groups, group, size = [], [], 0
    for name, shape in shapes.items():
        n = 2 * math.prod(shape)
        if group and size + n > shard_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(name)
        size += n
    groups.append(group)
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):
        file = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: torch.randn(shapes[n], generator=gen, dtype=torch.bfloat16) for n in names}
        save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({n: file for n in names})
        del shard
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total



def _sync_and_clear(*paths):
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    os.sync()


def timed(cmd, env=None):
    """(wall seconds, peak RSS bytes, stdout) of one command, run as a user runs it."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=dict(os.environ, **(env or {})))
        _, status, rusage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss: its peak RSS, KiB)
        took = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read()}")
        return took, rusage.ru_maxrss * 1024, out.read()


def best_of(n, run, clear):
    """Best of n runs of ``run()`` -> (seconds, rss, out); ``clear()`` before each (and one warm-up run)."""
    results = []
    for i in range(n + 1):
        clear()
        r = run()
        if i:  # the first run only warms the page cache
            results.append(r)
    return min(results, key=lambda r: r[0])


def largest_file(folder: str) -> int:
    return max(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def _in_process(out: str) -> float:
    m = re.search(r" in ([0-9.]+)s -> ", out)
    return float(m.group(1)) if m else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-json", default=os.path.join(ROOT, "examples/qwen2vl/model_2b.json"))
    ap.add_argument("--layouts", nargs="+", default=["1:0 0 10 20", "2:0 0 10 20"],
                    help="TP:pipeline-layer-index, e.g. '1:0' (no PP) or '2:0 0 10 20'")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (after one warm-up) for every command")
    ap.add_argument("--export", action="store_true", help="also time the export back to HF from every layout")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--json", help="also write the figures here (scripts/bench_report.py rows)")
    ap.add_argument("--generate", help=argparse.SUPPRESS)  # child mode: write the random HF folder here
    args = ap.parse_args(argv)
    if args.generate:
        size = make_random_hf(args.generate, args.model_json)
        print(size)
        return 0

    free = shutil.disk_usage(args.tmp).free
    need = (3 + 2 * len(args.layouts)) * 5e9  # HF folder, its copy, our checkpoints, their copies, an export
    if free < need:
        print(f"error: {args.tmp}: {free / 1e9:.1f} GB free, the benchmark needs {need / 1e9:.0f} GB", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.tmp)
    try:
        hf, copy, out = (os.path.join(work, n) for n in ("hf", "cp", "hf_out"))
        start = time.time()
        size = int(subprocess.run([sys.executable, os.path.abspath(__file__), "--generate", hf, "--model-json",
                                   args.model_json], check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"generated {size / 1e9:.2f} GB of random bf16 weights in {time.time() - start:.0f}s", flush=True)
        cp_cache = {}

        def cp_of(src):
            if src not in cp_cache:
                cp_cache[src] = best_of(args.repeat, lambda: timed(["cp", "-r", src, copy]),
                                        lambda: _sync_and_clear(copy))[0]
                _sync_and_clear(copy)
            return cp_cache[src]

        rows = []  # (name, seconds, in-process seconds, cp seconds, input bytes, peak rss, largest file written)
        for layout in args.layouts:  # one checkpoint on disk at a time: the page cache holds what is timed
            tp, index = layout.split(":")
            mm = os.path.join(work, "mm")
            cmd = ["bash", "examples/qwen2vl/modelconvert.sh", "--no-progress"]
            env = dict(LOAD_DIR=hf, SAVE_DIR=mm, TP=tp, PIPELINE_LAYER_INDEX=index)
            took, rss, stdout = best_of(args.repeat, lambda: timed(cmd, env), lambda: _sync_and_clear(mm))
            cp = cp_of(hf)
            rows.append((f"convert HF->MM TP={tp} layer index [{index}]", took, _in_process(stdout), cp,
                         folder_bytes(hf), rss, largest_file(mm)))
            print(stdout.strip(), flush=True)
            if args.export:
                cmd = [sys.executable, "examples/qwen2vl/qwen2vl_convert_to_hf.py", "--load-dir", mm, "--save-dir",
                       out, "--hf-dir", hf, "--no-progress"]
                took, rss, stdout = best_of(args.repeat, lambda: timed(cmd), lambda: _sync_and_clear(out))
                cp_cache.pop(mm, None)
                cp = cp_of(mm)
                rows.append((f"export MM->HF from TP={tp} [{index}]", took, _in_process(stdout), cp,
                             folder_bytes(mm), rss, largest_file(out)))
                print(stdout.strip(), flush=True)
            _sync_and_clear(out, mm)
        print(f"\n{'command (end to end)':40s} {'wall':>7s} {'cp -r':>7s} {'x cp':>6s} {'in-proc':>8s} "
              f"{'peak RSS':>9s} {'largest file':>12s} {'RSS/file':>8s}")
        for name, took, inproc, cp, nbytes, rss, biggest in rows:
            print(f"{name:40s} {took:6.2f}s {cp:6.2f}s {took / cp:6.2f} {inproc:7.2f}s "
                  f"{rss / 1e9:8.2f}G {biggest / 1e9:11.2f}G {rss / biggest:8.2f}")
        print("(cp -r is of each command's input folder: the HF folder for HF->MM, the converted checkpoint "
              "for the export)")
        if args.json:
            from scripts.bench_report import row, write_rows

            out_rows = []
            for name, took, inproc, cp, nbytes, rss, biggest in rows:
                out_rows += [row(f"{name}, whole command", "s", "lower", took, cp,
                                 "cp -r of its input folder", f"{nbytes / 1e9:.2f} GB in; in-process {inproc:.2f}s"),
                             row(f"peak RSS {name}", "GB", "lower", rss / 1e9, biggest / 1e9,
                                 "its largest output file")]
            write_rows(args.json, f"Qwen2-VL-2B-shaped random bf16 weights, {size / 1e9:.2f} GB "
                                  f"({os.path.basename(args.model_json)}), commands end to end", out_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
