"""Shared helpers for the data tests: a tiny local processor and the HF reference path."""

import json
import re

import numpy as np
import torch
from PIL import Image

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def make_processor_dir(path: str) -> str:
    from scripts.make_tiny_qwen2vl import make_tiny_qwen2vl

    make_tiny_qwen2vl(path, with_model=False, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return path


def save_image(path, width, height, seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path, format=fmt)
    return str(path)


def data_config(model_dir, dataset, cache_dir, dataset_dir=".", **basic):
    cfg = {
        "dataset_param": {
            "dataset_type": "huggingface",
            "preprocess_parameters": {"model_name_or_path": model_dir, "min_pixels": MIN_PIXELS,
                                      "max_pixels": MAX_PIXELS},
            "basic_parameters": {"template": "qwen2vl", "dataset_dir": dataset_dir, "dataset": dataset,
                                 "cache_dir": cache_dir, "cutoff_len": 1024,
                                 "preprocessing_num_workers": 1, **basic},
        },
        "dataloader_param": {"batch_size": 2, "num_workers": 0, "shuffle": True, "drop_last": False},
    }
    return cfg


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def hf_messages(messages):
    """MLLM messages -> HF chat messages with {"type": "image"} / {"type": "video"} items at the placeholders."""
    out = []
    for m in messages:
        content = m["content"]
        if "<image>" not in content and "<video>" not in content:
            out.append({"role": m["role"], "content": content})
            continue
        items = []
        for piece in re.split(r"(<image>|<video>)", content):
            if piece in ("<image>", "<video>"):
                items.append({"type": piece[1:-1]})
            elif piece:
                items.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": items})
    return out


def hf_reference(tokenizer, image_processor, messages, image_paths):
    """What Hugging Face's Qwen2-VL processing gives: the chat template, pads expanded as
    Qwen2VLProcessor does, then tokenized; pixels from the image processor."""
    text = tokenizer.apply_chat_template(hf_messages(messages), tokenize=False)
    out = {"pixel_values": None, "image_grid_thw": None}
    if image_paths:
        px = image_processor(images=[Image.open(p) for p in image_paths], return_tensors="pt")
        out.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        merge = image_processor.merge_size ** 2
        pieces = text.split("<|image_pad|>")
        text = pieces[0] + "".join("<|image_pad|>" * int(g.prod() // merge) + p
                                   for g, p in zip(px["image_grid_thw"], pieces[1:]))
    out["input_ids"] = torch.tensor(tokenizer(text)["input_ids"])
    return out
