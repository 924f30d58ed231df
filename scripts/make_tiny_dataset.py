"""Draw a tiny LLaVA-Instruct-style dataset with Pillow, offline.

    python scripts/make_tiny_dataset.py --out-dir ./data/tiny

Writes ``OUT/train2017/<id>.jpg`` (COCO-like folder) and
``OUT/llava_instruct_tiny.json`` in the LLaVA-Instruct-150K schema (``id``,
``image``, ``conversations`` with ``from: human|gpt`` and an ``<image>``
placeholder), so the quickstart runs it through the same
``llava_instruct_2_mllm_demo_format.py`` as the real data.  Every image shows
one shape in one colour at one place; the answer depends on the picture only,
so a model that answers correctly after training has used its vision tower.
"""
import argparse
import itertools
import os
import random

from PIL import Image, ImageDraw

from mindspeed_mm.jsonio import write_json_atomic

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
PLACES = ("left", "right", "top", "bottom")
QUESTIONS = (
    "What is in the picture?",
    "Describe the shape in the image.",
    "What do you see?",
)


def _draw(shape, colour, place, size, rng):
    w, h = size
    img = Image.new("RGB", size, (245, 245, 240))
    d = ImageDraw.Draw(img)
    r = min(w, h) // 5
    cx = {"left": w // 4, "right": 3 * w // 4}.get(place, w // 2)
    cy = {"top": h // 4, "bottom": 3 * h // 4}.get(place, h // 2)
    cx += rng.randint(-r // 4, r // 4)
    cy += rng.randint(-r // 4, r // 4)
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def make_tiny_dataset(out_dir: str, num_images: int = 48, seed: int = 0) -> str:
    """Write the images and the LLaVA-format JSON; return the JSON's path."""
    rng = random.Random(seed)
    image_dir = os.path.join(out_dir, "train2017")
    os.makedirs(image_dir, exist_ok=True)
    combos = list(itertools.product(SHAPES, COLOURS, PLACES))
    rng.shuffle(combos)
    records = []
    for i in range(num_images):
        shape, colour, place = combos[i % len(combos)]
        size = rng.choice([(84, 84), (112, 84), (84, 112), (112, 112)])
        name = f"{i:012d}.jpg"
        _draw(shape, colour, place, size, rng).save(os.path.join(image_dir, name), quality=95)
        question = QUESTIONS[i % len(QUESTIONS)]
        prompt = f"<image>\n{question}" if i % 2 == 0 else f"{question}\n<image>"
        records.append({
            "id": f"{i:012d}",
            "image": name,
            "conversations": [
                {"from": "human", "value": prompt},
                {"from": "gpt", "value": f"A {colour} {shape} on the {place}."},
            ],
        })
    path = os.path.join(out_dir, "llava_instruct_tiny.json")
    write_json_atomic(path, records, indent=1)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="./data/tiny")
    parser.add_argument("--num-images", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_dataset(args.out_dir, args.num_images, args.seed)
    print(f"wrote {args.num_images} images to {os.path.join(args.out_dir, 'train2017')} and {path}")


if __name__ == "__main__":
    main()
