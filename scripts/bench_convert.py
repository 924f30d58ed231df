"""Conversion speed and memory on a 2B-shaped checkpoint, next to `cp -r` of the same HF folder.

    python scripts/bench_convert.py                     # the guide's split: TP=1, --pipeline-layer-index 0 0 10 20
    python scripts/bench_convert.py --layouts "1:0" "2:0 0 10 20" --export

Generates Qwen2-VL-2B-shaped random bf16 weights (~4.4 GB, two safetensors shards
and the hub's flat config.json) into a temporary folder, deleted at the end.  Each
measurement runs in a fresh process, after `sync`, with the HF files in the page
cache for both `cp -r` and the conversion; the best of --repeat runs is kept.
Targets (issue 4): conversion time <= 1.5x `cp -r`, peak RSS < 2.5x the largest rank file.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Runs in a child process so its peak RSS is the conversion's own.
_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from checkpoint.convert import convert_hf_to_mm, convert_mm_to_hf
start = time.time()
kwargs = json.loads(sys.argv[2])
if sys.argv[1] == "to_mm":
    s = convert_hf_to_mm(progress=False, **kwargs)
else:
    s = convert_mm_to_hf(progress=False, **kwargs)
# VmHWM: this process image's own peak (ru_maxrss would include the parent's memory inherited by fork)
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({{"seconds": time.time() - start, "max_rss": hwm, "summary": str(s)}}))
"""


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


def time_cp(src: str, dst: str) -> float:
    _sync_and_clear(dst)
    start = time.time()
    subprocess.run(["cp", "-r", src, dst], check=True)
    took = time.time() - start
    _sync_and_clear(dst)
    return took


def run_child(direction: str, kwargs: dict) -> dict:
    _sync_and_clear(kwargs["save_dir"])
    start = time.time()
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT), direction, json.dumps(kwargs)],
                         check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = time.time() - start  # with interpreter and torch start-up, as a CLI call
    return result


def largest_file(folder: str) -> int:
    return max(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-json", default=os.path.join(ROOT, "examples/qwen2vl/model_2b.json"))
    ap.add_argument("--layouts", nargs="+", default=["1:0 0 10 20"],
                    help="TP:pipeline-layer-index, e.g. '1:0' (no PP) or '2:0 0 10 20'")
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs for cp and each conversion")
    ap.add_argument("--export", action="store_true", help="also time the export back to HF (first layout)")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--json", help="also write the figures here (scripts/bench_report.py rows)")
    args = ap.parse_args(argv)

    free = shutil.disk_usage(args.tmp).free
    need = 4 * 4.6e9  # HF folder, its copy, our checkpoint (+ tied copy), an export
    if free < need:
        print(f"error: {args.tmp}: {free / 1e9:.1f} GB free, the benchmark needs {need / 1e9:.0f} GB", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="bench_convert_", dir=args.tmp)
    try:
        hf, copy, mm, out = (os.path.join(work, n) for n in ("hf", "cp", "mm", "hf_out"))
        start = time.time()
        size = make_random_hf(hf, args.model_json)
        print(f"generated {size / 1e9:.2f} GB of random bf16 weights in {time.time() - start:.0f}s", flush=True)
        cp = min(time_cp(hf, copy) for _ in range(args.repeat))
        print(f"cp -r: {cp:.2f}s", flush=True)
        rows = []
        for layout in args.layouts:
            tp, index = layout.split(":")
            kwargs = dict(load_dir=hf, save_dir=mm, tensor_parallel_size=int(tp),
                          pipeline_layer_index=[int(i) for i in index.split()])
            runs = [run_child("to_mm", kwargs) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["seconds"])
            rank_file = largest_file(os.path.join(mm, "release"))
            rows.append((f"HF->MM TP={tp} layer index [{index}]", best, rank_file))
            print(best["summary"], flush=True)
            if args.export and layout == args.layouts[0]:
                exp = min((run_child("to_hf", dict(load_dir=mm, save_dir=out, hf_dir=hf))
                           for _ in range(args.repeat)), key=lambda r: r["seconds"])
                rows.append((f"MM->HF from TP={tp} [{index}]", exp, largest_file(out)))
                _sync_and_clear(out)
            _sync_and_clear(mm)
        print(f"\n{'conversion':38s} {'time':>7s} {'x cp':>6s} {'CLI wall':>9s} {'peak RSS':>9s} "
              f"{'largest file':>12s} {'RSS/file':>8s}")
        print(f"{'cp -r of the HF folder':38s} {cp:6.2f}s {1:6.2f}")
        for name, r, biggest in rows:
            print(f"{name:38s} {r['seconds']:6.2f}s {r['seconds'] / cp:6.2f} {r['wall']:8.2f}s "
                  f"{r['max_rss'] / 1e9:8.2f}G {biggest / 1e9:11.2f}G {r['max_rss'] / biggest:8.2f}")
        if args.json:
            from scripts.bench_report import row, write_rows

            out_rows = []
            for name, r, biggest in rows:
                out_rows += [row(f"conversion {name}", "s", "lower", r["seconds"], cp, "cp -r of the HF folder"),
                             row(f"peak RSS {name}", "GB", "lower", r["max_rss"] / 1e9, biggest / 1e9,
                                 "its largest output file")]
            write_rows(args.json, f"Qwen2-VL-2B-shaped random bf16 weights, {size / 1e9:.2f} GB ({os.path.basename(args.model_json)})",
                       out_rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
