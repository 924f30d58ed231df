"""Preprocessing throughput: our pipeline next to Hugging Face's Qwen2-VL processing.

    python scripts/bench_preprocess.py --samples 400 --workers 2

Generates ~448x448 JPEGs and LLaVA-style conversations, then times, on the same samples
and with the same number of worker processes:
  hf       chat template + Qwen2VLImageProcessor + tokenizer (what Qwen2VLProcessor does)
  ours     the cache build: tokens, labels, image decode and grid (run once per dataset)
  ours+px  a training epoch through the DataLoader: cached tokens + pixels + M-RoPE positions
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_QUESTIONS = ["What is happening in this picture?", "Describe the scene in detail.",
              "How many people can you see?", "What colour is the bus?"]
_ANSWER = ("A man is riding a bicycle down a busy street next to a red bus. There are several people "
           "waiting at the bus stop, and a dog is sitting near the bench. ")


def make_samples(folder: str, n: int, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        w, h = (int(x) for x in rng.integers(400, 500, size=2))
        # smooth random colours compress like photos, unlike white noise
        small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        path = os.path.join(folder, f"{i:06d}.jpg")
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(path, quality=90)
        turns = int(rng.integers(1, 3))
        msgs = []
        for t in range(turns):
            q = _QUESTIONS[(i + t) % len(_QUESTIONS)]
            msgs += [{"role": "user", "content": ("<image>\n" + q) if t == 0 else q},
                     {"role": "assistant", "content": _ANSWER * int(rng.integers(1, 4))}]
        records.append({"images": [path], "messages": msgs})
    data = os.path.join(folder, "bench.json")
    with open(data, "w") as f:
        json.dump(records, f)
    return data


_hf = None


def _hf_init(model_dir, min_pixels, max_pixels):
    global _hf
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    _hf = (AutoTokenizer.from_pretrained(model_dir),
           Qwen2VLImageProcessor.from_pretrained(model_dir, min_pixels=min_pixels, max_pixels=max_pixels))


def _hf_one(record):
    from PIL import Image

    from tests.data_fixtures import hf_messages

    tok, ip = _hf
    text = tok.apply_chat_template(hf_messages(record["messages"]), tokenize=False)
    px = ip(images=[Image.open(p) for p in record["images"]], return_tensors="np")
    n = int(px["image_grid_thw"][0].prod()) // ip.merge_size ** 2
    ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n))["input_ids"]
    return len(ids), px["pixel_values"].shape[0]


def bench_hf(records, model_dir, workers, min_pixels, max_pixels) -> float:
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_hf_init, initargs=(model_dir, min_pixels, max_pixels)) as pool:
        pool.map(_hf_one, records[:workers * 2])  # warm up: imports and file caches
        t0 = time.perf_counter()
        pool.map(_hf_one, records, chunksize=16)
        return len(records) / (time.perf_counter() - t0)


def bench_ours(data, model_dir, workers, min_pixels, max_pixels, cache_dir):
    from mindspeed_mm.data.builder import build_dataloader, build_train_valid_datasets
    from mindspeed_mm.data.config import data_config_from_dict

    cfg = data_config_from_dict({
        "dataset_param": {
            "preprocess_parameters": {"model_name_or_path": model_dir, "min_pixels": min_pixels,
                                      "max_pixels": max_pixels},
            "basic_parameters": {"dataset": data, "cache_dir": cache_dir, "cutoff_len": 4096,
                                 "preprocessing_num_workers": workers, "overwrite_cache": True}},
        "dataloader_param": {"batch_size": 1, "num_workers": workers, "shuffle": False, "drop_last": False},
    })
    t0 = time.perf_counter()
    ds, _ = build_train_valid_datasets(cfg, progress=False, log=lambda m: None)
    build = len(ds) / (time.perf_counter() - t0)
    loader = iter(build_dataloader(ds, cfg, pin_memory=False))
    next(loader)  # worker start-up is paid once per run, not per sample
    t0 = time.perf_counter()
    for _ in range(len(ds) - 1):
        next(loader)
    return build, (len(ds) - 1) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model-dir", help="HF Qwen2-VL folder (default: a tiny one made here)")
    ap.add_argument("--min-pixels", type=int, default=56 * 56)
    ap.add_argument("--max-pixels", type=int, default=28 * 28 * 1280)
    ap.add_argument("--json", help="also write the figures here (scripts/bench_report.py rows)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from scripts.make_tiny_qwen2vl import make_tiny_qwen2vl

            model_dir = os.path.join(tmp, "tiny")
            make_tiny_qwen2vl(model_dir, with_model=False, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
        data = make_samples(tmp, args.samples)
        with open(data) as f:
            records = json.load(f)
        hf = bench_hf(records, model_dir, args.workers, args.min_pixels, args.max_pixels)
        build, epoch = bench_ours(data, model_dir, args.workers, args.min_pixels, args.max_pixels,
                                  os.path.join(tmp, "cache"))
    print(f"{args.samples} samples, ~448x448 JPEG, {args.workers} workers")
    print(f"  hf processor (template + image processor + tokenizer): {hf:8.1f} samples/s")
    print(f"  ours, cache build (tokens, labels, image check, grid): {build:8.1f} samples/s")
    print(f"  ours, training loader (cached tokens + pixels + M-RoPE): {epoch:8.1f} samples/s")
    if args.json:
        from scripts.bench_report import row, write_rows

        reference = "HF chat template + Qwen2VLImageProcessor + tokenizer"
        write_rows(args.json, f"{args.samples} samples, ~448x448 JPEG, {args.workers} workers", [
            row("preprocessing: training loader", "samples/s", "higher", epoch, hf, reference),
            row("preprocessing: cache build (once)", "samples/s", "higher", build, hf, reference)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
