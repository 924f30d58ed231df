"""A synthetic LLaVA-Instruct-like dataset in the project's MLLM format, drawn offline and seeded.

    python scripts/make_llava_like.py --out-dir ./data/llava_like --samples 200 [--seed 0]

Writes ``OUT/images/<i>.jpg`` and ``OUT/llava_like.json`` (records ``{"images": [path],
"messages": [{"role": "user"|"assistant", "content": ...}]}``, the first user turn opening with
``<image>``), the format ``data.json``'s ``dataset`` points at.

Shape of the data, close to LLaVA-Instruct-150K + COCO as MindSpeed-MM reports it (563-689 tokens on
average, ~100 to ~2000):

* one image per sample, width and height drawn independently from 224 to 672 px (smooth random
  colours with a few drawn shapes, so JPEG sizes are photo-like);
* 1-3 turns (probabilities 0.45 / 0.35 / 0.20);
* each answer's length is log-normal (a long tail: a few answers run to several hundred words),
  questions are short.

At the pixel limits of :data:`MIN_PIXELS` / :data:`MAX_PIXELS` (56x56 .. 448x448: 4 to 256 image
tokens per image after Qwen2-VL's 2x2 merge) and with the tiny tokenizer of
scripts/make_tiny_qwen2vl.py, the Qwen2-VL template's tokens (image tokens included) average near
600 per sample with a tail to ~2000; :func:`token_lengths` measures them through our data pipeline.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MIN_PIXELS = 56 * 56
MAX_PIXELS = 448 * 448
TURN_PROBS = (0.45, 0.35, 0.20)
ANSWER_WORDS_MEDIAN = 90   # log-normal median of one answer's words
ANSWER_WORDS_SIGMA = 0.8   # log-normal sigma: the long tail
MAX_ANSWER_WORDS = 900

_QUESTIONS = ("What is happening in this picture?", "Describe the scene in detail.",
              "How many people can you see?", "What colour is the bus?", "What is the man holding?",
              "Why might the dog be sitting there?", "What time of day is it?",
              "Is there anything unusual about this image?", "Where could this photo have been taken?")
_WORDS = ("a man is riding a bicycle down a busy street next to a red bus there are several people waiting at "
          "the bus stop and a dog is sitting near the bench the sky is clear and the buildings on the left "
          "are tall with many windows in the background a woman carries a bag of groceries while two "
          "children play with a ball on the sidewalk cars are parked along the road and a traffic light "
          "shows green it looks like a warm afternoon in a city centre").split()


def _image(rng, w: int, h: int):
    import numpy as np
    from PIL import Image, ImageDraw

    small = rng.integers(0, 255, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x, y = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        r = int(rng.integers(10, min(w, h) // 4))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x, y, x + r, y + r), fill=colour)
    return img


def _answer(rng) -> str:
    n = int(min(MAX_ANSWER_WORDS, max(3, rng.lognormal(mean=math.log(ANSWER_WORDS_MEDIAN),
                                                           sigma=ANSWER_WORDS_SIGMA))))
    start = int(rng.integers(0, len(_WORDS)))
    words = [_WORDS[(start + k) % len(_WORDS)] for k in range(n)]
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def make_llava_like(out_dir: str, samples: int = 200, seed: int = 0) -> str:
    """Draw the images and write the MLLM JSON; returns the JSON's path."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    records = []
    for i in range(samples):
        w, h = (int(x) for x in rng.integers(224, 673, size=2))
        path = os.path.abspath(os.path.join(image_dir, f"{i:06d}.jpg"))
        _image(rng, w, h).save(path, quality=90)
        turns = int(rng.choice(len(TURN_PROBS), p=TURN_PROBS)) + 1
        msgs = []
        for t in range(turns):
            q = _QUESTIONS[int(rng.integers(0, len(_QUESTIONS)))]
            msgs += [{"role": "user", "content": ("<image>\n" + q) if t == 0 else q},
                     {"role": "assistant", "content": _answer(rng)}]
        records.append({"images": [path], "messages": msgs})
    path = os.path.join(out_dir, "llava_like.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def token_lengths(data_json: str, processor_dir: str, cache_dir: str, min_pixels: int = MIN_PIXELS,
                  max_pixels: int = MAX_PIXELS, cutoff_len: int = 8192):
    """(dataset, LLM tokens per sample, ViT patches per sample) through our data pipeline (the cache build)."""
    from mindspeed_mm.data.builder import build_train_valid_datasets
    from mindspeed_mm.data.config import data_config_from_dict

    cfg = data_config_from_dict({
        "dataset_param": {
            "preprocess_parameters": {"model_name_or_path": processor_dir, "min_pixels": min_pixels,
                                      "max_pixels": max_pixels},
            "basic_parameters": {"dataset": data_json, "cache_dir": cache_dir, "cutoff_len": cutoff_len}},
        "dataloader_param": {"batch_size": 1, "num_workers": 0, "shuffle": False},
    })
    dataset, _ = build_train_valid_datasets(cfg, progress=False, log=lambda *_: None)
    tokens, patches = dataset.sample_sizes()
    return dataset, tokens, patches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="./data/llava_like")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", action="store_true",
                    help="also measure the token lengths through our pipeline (tiny tokenizer, the pixel limits above)")
    args = ap.parse_args(argv)
    path = make_llava_like(args.out_dir, args.samples, args.seed)
    print(f"wrote {args.samples} samples to {path}")
    if args.stats:
        import numpy as np

        from scripts.make_tiny_qwen2vl import make_tiny_qwen2vl

        proc = os.path.join(args.out_dir, "processor")
        make_tiny_qwen2vl(proc, with_model=False, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        _, tokens, _ = token_lengths(path, proc, os.path.join(args.out_dir, "cache"))
        q = np.percentile(tokens, [0, 10, 50, 90, 99, 100]).astype(int).tolist()
        print(f"tokens per sample: mean {tokens.mean():.0f}, min/p10/p50/p90/p99/max {q}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
