"""Smoke tests of the benchmark scripts: the LLaVA-like generator's shape of data, and one global batch of
scripts/bench_packing.py's four rows on a micro model (in a subprocess: it starts a gloo process group)."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_llava_like_lengths_and_shapes(tmp_path):
    from PIL import Image

    from scripts.make_llava_like import MAX_PIXELS, MIN_PIXELS, make_llava_like, token_lengths
    from scripts.make_tiny_qwen2vl import make_tiny_qwen2vl

    path = make_llava_like(str(tmp_path / "data"), samples=80, seed=0)
    records = json.load(open(path))
    assert len(records) == 80
    turns = [len(r["messages"]) // 2 for r in records]
    assert set(turns) == {1, 2, 3}
    for r in records[:20]:
        w, h = Image.open(r["images"][0]).size
        assert 224 <= w <= 672 and 224 <= h <= 672
        assert r["messages"][0]["content"].startswith("<image>") and r["messages"][1]["role"] == "assistant"
    again = json.load(open(make_llava_like(str(tmp_path / "data"), samples=80, seed=0)))
    assert again == records  # seeded

    proc = str(tmp_path / "processor")
    make_tiny_qwen2vl(proc, with_model=False, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    _, tokens, patches = token_lengths(path, proc, str(tmp_path / "cache"))
    assert len(tokens) == 80 and (patches > 0).all()
    assert 480 <= tokens.mean() <= 720, tokens.mean()  # mean near 600
    assert tokens.max() >= 2 * np.median(tokens)  # a long tail
    assert tokens.min() >= 100


def test_bench_packing_one_step_micro_model(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_packing.py"), "--samples", "12", "--global-batch", "4",
           "--steps", "1", "--max-tokens", "2048", "--hidden-size", "64", "--ffn-hidden-size", "128", "--layers", "1",
           "--heads", "2", "--kv-heads", "1", "--vit-hidden-size", "32", "--vit-layers", "1", "--vit-heads", "2",
           "--json", str(out)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", MASTER_PORT="29533")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for name in ("ours packed", "ours unpacked", "HF padded-4", "HF batch 1", "efficiency"):
        assert name in proc.stdout
    rows = json.load(open(out))["rows"]
    assert len(rows) == 3 and all(r["ours"] > 0 and r["reference"] > 0 for r in rows)
