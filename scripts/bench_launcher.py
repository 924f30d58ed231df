"""The launcher end to end: examples/qwen2vl/finetune_qwen2vl_2b.sh's iteration (data included) next to HF's step.

    python scripts/bench_launcher.py [--iters 30] [--warmup 5] [--rounds 2] [--gbs 2] [--mbs 1] [--json out.json]

Ours is the real launcher (``bash examples/qwen2vl/finetune_qwen2vl_2b.sh --device cpu``: preflight, torchrun,
pretrain_qwen2vl.py, one process, GPUS_PER_NODE=1, fp32) on the quickstart's tiny model
(scripts/make_tiny_qwen2vl.py, converted with the project's converter) and drawn dataset
(scripts/make_tiny_dataset.py -> the LLaVA converter), with ``examples/qwen2vl/data.json`` copied and only its
paths changed (so its loader and preprocessing settings: 8 loader workers, 16 preprocessing workers, pin_memory,
shuffle).  Its figure is the steady-state "elapsed time per iteration (ms)" of the training log (the wall time
from one iteration's end to the next: loading, collation, forward/backward, optimizer, logging, the stop check),
the median over the iterations after ``--warmup``.

The reference is ``Qwen2VLForConditionalGeneration.from_pretrained`` of the same HF folder (its default
attention) + ``torch.optim.AdamW``, on the same samples in the same order (the training sampler's, seed 42),
collated beforehand into the same micro-batches (``--mbs``) and accumulated over the same global batch
(``--gbs``), timed step by step in this process (median).  Launcher runs and HF blocks alternate
(``--rounds``), so both see the same machine load.  The first iteration's loss of both must agree (same
weights, same samples, before any update).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ITER_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+) \|"
                       r".*?\| lm loss: ([-+0-9.naninfE]+) \|")
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # the quickstart's processor (data.json's own bounds stay)
SEED = 42  # the launcher's --seed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(folder: str, images: int) -> dict:
    """The tiny HF model, its converted checkpoint, the drawn dataset and data.json (the example's, paths changed)."""
    from checkpoint.convert import convert_hf_to_mm
    from mindspeed_mm.data.llava import convert_file
    from scripts.make_tiny_dataset import make_tiny_dataset
    from scripts.make_tiny_qwen2vl import make_tiny_qwen2vl

    hf_dir, mm_dir, data_dir = (os.path.join(folder, n) for n in ("hf", "mm", "data"))
    make_tiny_qwen2vl(hf_dir, seed=0, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    convert_hf_to_mm(hf_dir, mm_dir, tensor_parallel_size=1, pipeline_num_layers=[2], params_dtype="fp32", overwrite=True,
                     progress=False)
    llava = make_tiny_dataset(data_dir, num_images=images)
    mllm = os.path.join(data_dir, "mllm_format_llava_instruct_data.json")
    convert_file(llava, os.path.join(data_dir, "train2017"), mllm, log=lambda *_: None)
    with open(os.path.join(ROOT, "examples", "qwen2vl", "data.json")) as f:
        data = json.load(f)
    data["dataset_param"]["preprocess_parameters"]["model_name_or_path"] = hf_dir
    basic = data["dataset_param"]["basic_parameters"]
    basic.update(dataset_dir=data_dir, dataset=mllm, cache_dir=os.path.join(data_dir, "cache_dir"))
    data_json = os.path.join(folder, "data.json")
    with open(data_json, "w") as f:
        json.dump(data, f, indent=1)
    return dict(hf_dir=hf_dir, mm_dir=mm_dir, data_json=data_json, folder=folder)


def run_launcher(paths: dict, args, tag: str) -> list:
    """One launcher run: [(iteration, ms, loss)] from its log lines."""
    env = dict(os.environ, GPUS_PER_NODE="1", TP="1", PP="1", PRECISION="fp32", MBS=str(args.mbs),
               GBS=str(args.gbs), TRAIN_ITERS=str(args.iters), LOG_INTERVAL="1", SAVE_INTERVAL=str(10 ** 6),
               MM_DATA=paths["data_json"], MM_MODEL=os.path.join(paths["mm_dir"], "model.json"),
               LOAD_PATH=paths["mm_dir"], SAVE_PATH=os.path.join(paths["folder"], f"save_{tag}"),
               LOG_DIR=os.path.join(paths["folder"], "logs"), MASTER_PORT=str(_free_port()),
               PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    for key in ("OMP_NUM_THREADS", "MM_DEVICE"):  # the launcher's own choice, as a user gets it
        env.pop(key, None)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cmd = ["bash", os.path.join(ROOT, "examples", "qwen2vl", "finetune_qwen2vl_2b.sh"), "--device", "cpu",
           "--no-save-optim", "--no-save-rng"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"the launcher failed (exit code {proc.returncode}):\n{out[-4000:]}")
    if args.verbose:
        print(out)
    rows = [(int(m.group(1)), float(m.group(2)), float(m.group(3))) for m in ITER_LINE.finditer(out)]
    if len(rows) != args.iters:
        raise RuntimeError(f"expected {args.iters} iteration lines, found {len(rows)}:\n{out[-4000:]}")
    workers = re.findall(r"data: loader uses .*", out)
    return rows, (workers[0] if workers else "")


def hf_reference(paths: dict, args):
    """(step function over global batch k, the global batches): HF model + AdamW on the sampler's micro-batches."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from mindspeed_mm.constants import IGNORE_INDEX
    from mindspeed_mm.data.builder import build_train_valid_datasets
    from mindspeed_mm.data.collate import Qwen2VLCollator
    from mindspeed_mm.data.config import load_data_config
    from mindspeed_mm.data.sampler import ResumableBatchSampler

    cfg = load_data_config(paths["data_json"])
    dataset, _ = build_train_valid_datasets(cfg, progress=False, log=lambda *_: None, max_seq_length=1024)
    dl = cfg.dataloader_param
    sampler = iter(ResumableBatchSampler(len(dataset), args.mbs, 0, 1, 0, dl.shuffle, SEED, dl.drop_last))
    collate = Qwen2VLCollator(dataset.pad_token_id, dl.collate_param.pad_to_multiple_of,
                              dl.collate_param.ignore_pad_token_for_loss)
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw", "labels")
    per_step = args.gbs // args.mbs
    batches = []
    for _ in range(args.iters):
        mbs = [collate([dataset[i] for i in next(sampler)]) for _ in range(per_step)]
        tokens = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in mbs]
        batches.append([({k: b[k] for k in keys}, n / sum(tokens)) for b, n in zip(mbs, tokens)])
    if args.threads:
        torch.set_num_threads(args.threads)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(paths["hf_dir"], torch_dtype=torch.float32).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step(k: int) -> float:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for b, weight in batches[k]:
            loss = hf(**b, use_cache=False).loss * weight  # a mean over the global batch's supervised tokens
            loss.backward()
            total += float(loss)
        opt.step()
        return total

    return step


def measure(args) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        paths = prepare(args.work_dir or folder, args.images)
        ours, ours_first_loss, hf_times, hf_first_loss, workers = [], None, [], None, ""
        step = None
        for r in range(args.rounds):
            rows, workers = run_launcher(paths, args, f"r{r}")
            ours += [ms for it, ms, _ in rows if it > args.warmup]
            ours_first_loss = rows[0][2]
            if step is None:
                step = hf_reference(paths, args)
            for k in range(args.iters):
                start = time.perf_counter()
                loss = step(k)
                took = (time.perf_counter() - start) * 1000
                if k == 0 and hf_first_loss is None:
                    hf_first_loss = loss
                if k >= args.warmup:
                    hf_times.append(took)
            print(f"round {r + 1}/{args.rounds}: ours median {statistics.median(ours):.1f} ms/iteration, HF median "
                  f"{statistics.median(hf_times):.1f} ms/step", flush=True)
    import torch

    return dict(ours_ms=statistics.median(ours), ours_mean_ms=statistics.mean(ours), hf_ms=statistics.median(hf_times),
                hf_mean_ms=statistics.mean(hf_times), ours_n=len(ours), hf_n=len(hf_times),
                ours_loss=ours_first_loss, hf_loss=hf_first_loss, workers=workers, threads=torch.get_num_threads())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30, help="iterations per launcher run (and HF steps per block)")
    ap.add_argument("--warmup", type=int, default=5, help="first iterations of each run left out")
    ap.add_argument("--rounds", type=int, default=2, help="launcher runs, each followed by an HF block")
    ap.add_argument("--gbs", type=int, default=2, help="global batch (samples per iteration)")
    ap.add_argument("--mbs", type=int, default=1, help="micro-batch (the launcher's MBS; HF's too)")
    ap.add_argument("--images", type=int, default=48, help="samples in the drawn dataset")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per launcher run")
    ap.add_argument("--threads", type=int, help="torch CPU threads of both (OMP_NUM_THREADS for the launcher; "
                    "default: torch's choice in both)")
    ap.add_argument("--work-dir", help="keep the model, data and logs here (default: a temporary folder)")
    ap.add_argument("--verbose", action="store_true", help="print the launcher's output")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if args.gbs % args.mbs or args.iters <= args.warmup:
        ap.error("--gbs must be a multiple of --mbs and --iters larger than --warmup")
    res = measure(args)
    ratio = res["ours_ms"] / res["hf_ms"]
    gap = abs(res["ours_loss"] - res["hf_loss"])
    setup = (f"finetune_qwen2vl_2b.sh on the tiny Qwen2-VL (quickstart's), data.json defaults "
             f"({res['workers'] or 'loader workers as configured'}), GBS {args.gbs}, MBS {args.mbs}, fp32, CPU, "
             f"1 process; HF in-process with {res['threads']} threads; {args.rounds} round(s) of {args.iters} "
             f"iterations, first {args.warmup} of each left out")
    print(setup)
    print(f"{'':44s}{'ms/iteration (median)':>22s}{'mean':>9s}{'n':>5s}{'loss at 1':>12s}")
    print(f"{'ours: the launcher, end to end (data incl.)':44s}{res['ours_ms']:22.1f}{res['ours_mean_ms']:9.1f}"
          f"{res['ours_n']:5d}{res['ours_loss']:12.6f}")
    print(f"{'HF + AdamW step (batches collated before)':44s}{res['hf_ms']:22.1f}{res['hf_mean_ms']:9.1f}"
          f"{res['hf_n']:5d}{res['hf_loss']:12.6f}")
    print(f"ours / HF = {ratio:.2f} (target <= 1.2); first-iteration losses differ by {gap:.1e}")
    if args.json:
        from scripts.bench_report import row, write_rows

        write_rows(args.json, setup, [row(
            f"launcher iteration end to end, tiny model, GBS {args.gbs}", "ms/iter", "lower", res["ours_ms"],
            res["hf_ms"], "HF Qwen2-VL + torch AdamW step", f"first losses agree to {gap:.1e}")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
