"""The small steps of scripts/quickstart.sh that are easier in Python than in bash.

    python scripts/quickstart_steps.py data-json --out data/tiny/data.json --model-dir ckpt/hf_path/tiny ...
    python scripts/quickstart_steps.py check-export --export-dir DIR --input eval.json --answers answers.jsonl ...
    python scripts/quickstart_steps.py report --train-log L1 --pp-log L2 --answers answers.jsonl ...

`data-json` edits the guide's examples/qwen2vl/data.json the way the guide tells a user to
(paths, pixel limits, workers); `check-export` loads the exported folder with plain
`transformers` and compares its greedy answers with ours; `report` prints the closing summary.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mindspeed_mm.constants import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER  # noqa: E402  (after the path setup)
from mindspeed_mm.jsonio import write_json_atomic  # noqa: E402

# The quickstart's clips (8-24 frames of at most 112x84 at 4-12 fps): 4-8 frames of at most 112x112 pixels,
# 12-48 tokens a clip.  scripts/quickstart.sh passes the same to inference (--video-* flags).
VIDEO_SETTINGS = dict(video_fps=4.0, video_min_frames=4, video_max_frames=8, video_min_pixels=56 * 56,
                      video_max_pixels=112 * 112, video_total_pixels=None)

# A Megatron-style progress line: "iteration   12/  200 | ... | lm loss: 1.234E+00 |"
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([-+0-9.naninfE]+) \|")


def data_json(args) -> None:
    """The guide's data.json with this run's paths: the step a user does by hand for COCO."""
    with open(args.base) as f:
        cfg = json.load(f)
    pre = cfg["dataset_param"]["preprocess_parameters"]
    basic = cfg["dataset_param"]["basic_parameters"]
    loader = cfg["dataloader_param"]
    pre.update(model_name_or_path=args.model_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    basic.update(dataset_dir=args.dataset_dir, dataset=args.dataset, cache_dir=args.cache_dir,
                 preprocessing_num_workers=args.workers, cutoff_len=args.cutoff_len)
    if args.videos:  # the clips' records too, and the tiny clips' sampling (VIDEO_SETTINGS)
        basic["dataset"] = f"{args.dataset},{args.videos}"
        pre.update(VIDEO_SETTINGS)
    # A few dozen small samples: loader worker processes would cost more than they save.
    loader.update(num_workers=0, pin_memory=False)
    write_json_atomic(args.out, cfg, indent=4)
    print(f"wrote {args.out} (from {args.base}: model_name_or_path={args.model_dir}, dataset={args.dataset})")


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def hf_generate(export_dir: str, records: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers of the exported folder through transformers alone: its tokenizer's chat
    template, its image processor, Qwen2VLForConditionalGeneration.generate with the folder's own
    generation config (the stop ids our inference took from the HF folder too)."""
    import torch
    from PIL import Image
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from tests.data_fixtures import hf_messages

    tok = AutoTokenizer.from_pretrained(export_dir)
    image_processor = Qwen2VLImageProcessor.from_pretrained(export_dir)
    with open(os.path.join(export_dir, "config.json")) as f:
        architecture = json.load(f)["architectures"][0]  # Qwen2VL... or Qwen2_5_VLForConditionalGeneration
    model = getattr(transformers, architecture).from_pretrained(export_dir, dtype=torch.float32).eval()
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    answers = []
    for rec in records:
        text = tok.apply_chat_template(hf_messages(rec["messages"][:-1]), tokenize=False, add_generation_prompt=True)
        pixels = image_processor(images=[Image.open(p).convert("RGB") for p in rec["images"]], return_tensors="pt")
        for grid in pixels["image_grid_thw"]:  # one <|image_pad|> per merged patch, as Qwen2VLProcessor does
            n = int(grid.prod()) // image_processor.merge_size ** 2
            text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
        ids = tok(text.replace("<|placeholder|>", "<|image_pad|>"), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 mm_token_type_ids=(ids == image_pad).int(), pixel_values=pixels["pixel_values"],
                                 image_grid_thw=pixels["image_grid_thw"], max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)  # its own stop ids, as ours
        answers.append(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return answers


def check_export(args) -> None:
    with open(args.input) as f:
        records = json.load(f)[:args.count]
    ours = [row["response"] for row in read_jsonl(args.answers)[:args.count]]
    hf = hf_generate(args.export_dir, records, args.max_new_tokens)
    same = sum(a.strip() == b.strip() for a, b in zip(ours, hf))
    for a, b in zip(ours, hf):
        print(f"  ours: {a!r:40s} transformers: {b!r}")
    print(f"transformers loads {args.export_dir}; greedy answers equal ours on {same}/{len(hf)} images")
    write_json_atomic(args.out, {"export_dir": args.export_dir, "compared": len(hf), "same": same,
                                 "ours": ours, "transformers": hf}, indent=4)


def losses(path: str) -> dict[int, float]:
    with open(path, errors="replace") as f:
        return {int(m.group(1)): float(m.group(2)) for m in LOSS_LINE.finditer(f.read())}


def normalise(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").split())


def report(args) -> None:
    curve = losses(args.train_log)
    if not curve:
        raise SystemExit(f"error: {args.train_log}: no 'lm loss' lines")
    first, last = min(curve), max(curve)
    rows = read_jsonl(args.answers)
    correct = [normalise(r["response"]) == normalise(r["reference"] or "") for r in rows]
    bar = "=" * 78
    print(bar)
    print(f"quickstart done in {args.seconds:.0f}s")
    tail = [curve[i] for i in sorted(curve)[-10:]]
    print(f"fine-tuning (TP=1): loss {curve[first]:.3f} at iteration {first} -> {curve[last]:.3f} at iteration "
          f"{last} (mean of the last {len(tail)}: {sum(tail) / len(tail):.3f})")
    if args.pp_log and os.path.isfile(args.pp_log):
        pp = losses(args.pp_log)
        if pp:
            both = sorted(set(pp) & set(curve))
            gap = max(abs(pp[i] - curve[i]) for i in both) if both else float("nan")
            print(f"fine-tuning ({args.pp_label}): loss {pp[min(pp)]:.3f} at iteration {min(pp)} -> "
                  f"{pp[max(pp)]:.3f} at iteration {max(pp)}; same batches as TP=1, largest loss difference "
                  f"over iterations {both[0]}-{both[-1]}: {gap:.1e}")
    print(f"answers on training images: {sum(correct)}/{len(rows)} correct (exact match)")
    _show(rows, correct, args.show)
    if args.video_answers and os.path.isfile(args.video_answers):
        rows = read_jsonl(args.video_answers)
        correct = [normalise(r["response"]) == normalise(r["reference"] or "") for r in rows]
        print(f"answers on training clips (which way the square moves): {sum(correct)}/{len(rows)} correct")
        _show(rows, correct, min(args.show, 4))
    if args.export_check and os.path.isfile(args.export_check):
        with open(args.export_check) as f:
            check = json.load(f)
        print(f"export: {check['export_dir']} loads in transformers; its greedy answers equal ours on "
              f"{check['same']}/{check['compared']} images")
    print(bar)


def _show(rows, correct, count) -> None:
    for r, ok in list(zip(rows, correct))[:count]:
        question = " ".join(r["prompt"].replace(IMAGE_PLACEHOLDER, "").replace(VIDEO_PLACEHOLDER, "").split())
        print(f"  [{'ok' if ok else 'X '}] Q: {question}")
        print(f"       expected: {r['reference']}")
        print(f"       model:    {r['response']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data-json", help="the guide's data.json with this run's paths")
    p.add_argument("--base", default=os.path.join(ROOT, "examples/qwen2vl/data.json"))
    p.add_argument("--out", required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--dataset-dir", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--min-pixels", type=int, required=True)
    p.add_argument("--max-pixels", type=int, required=True)
    p.add_argument("--cutoff-len", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--videos", help="an MLLM file of video records (scripts/make_tiny_clips.py) to train on too")
    p.set_defaults(func=data_json)

    p = sub.add_parser("check-export", help="load the export with transformers and compare answers")
    p.add_argument("--export-dir", required=True)
    p.add_argument("--input", required=True, help="the MLLM file inference ran on")
    p.add_argument("--answers", required=True, help="our inference JSONL")
    p.add_argument("--count", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", required=True)
    p.set_defaults(func=check_export)

    p = sub.add_parser("report", help="the closing summary")
    p.add_argument("--train-log", required=True)
    p.add_argument("--pp-log")
    p.add_argument("--pp-label", default="PP=2")
    p.add_argument("--answers", required=True)
    p.add_argument("--video-answers")
    p.add_argument("--export-check")
    p.add_argument("--show", type=int, default=6)
    p.add_argument("--seconds", type=float, default=0.0)
    p.set_defaults(func=report)

    args = ap.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
