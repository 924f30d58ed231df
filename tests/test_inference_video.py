"""Inference with video clips: our greedy ids equal HF ``generate`` fed the same clips.

The tiny HF model of tests/test_inference_generate.py (attention sharpened), converted at TP=2; two
clips drawn with scripts/make_tiny_clips.py.  HF gets the chat template's text with each
``<|video_pad|>`` repeated once per merged patch, ``pixel_values_videos`` / ``video_grid_thw`` from
mindspeed_mm/data/video.py (checked against HF's own functions in tests/test_data_video.py, since HF's
video processor needs torchvision) and ``mm_token_type_ids`` 2 on video tokens.  Ours runs the
inference entry point: a chat with ``--video`` (and ``--image``), and an MLLM file with ``videos``, at
TP=1 and TP=2 (gloo).  Bad clips and placeholder mismatches are one line, exit 2.
"""
import json

import numpy as np
import pytest
import torch

from tests.multiproc import run_ranks
from tests.test_inference_generate import NEW, _hf_generate, _run_mains, hf_world

VIDEO = dict(video_fps=4.0, video_min_frames=2, video_max_frames=6, video_min_pixels=28 * 28,
             video_max_pixels=56 * 84)
VIDEO_FLAGS = ["--video-fps", "4", "--video-min-frames", "2", "--video-max-frames", "6",
               "--video-min-pixels", str(28 * 28), "--video-max-pixels", str(56 * 84)]
RECORDS = [
    {"messages": [{"role": "user", "content": "<video>Which way does the square move?"},
                  {"role": "assistant", "content": "left"}], "videos": ["left.mp4"]},
    {"messages": [{"role": "user", "content": "<image>Here a picture, <video> there a clip: compare."}],
     "images": ["wide.png"], "videos": ["up.mp4"]},
]


def _hf_inputs(tokenizer, image_processor, messages, images, videos):
    from PIL import Image

    from mindspeed_mm.data.config import VideoSettings
    from mindspeed_mm.data.video import load_video
    from tests.data_fixtures import hf_messages

    text = tokenizer.apply_chat_template(hf_messages(messages), add_generation_prompt=True, tokenize=False)
    merge = image_processor.merge_size ** 2
    inputs = {}
    if images:
        px = image_processor(images=[Image.open(p) for p in images], return_tensors="pt")
        inputs.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        for g in px["image_grid_thw"]:
            text = text.replace("<|image_pad|>", "<|placeholder_i|>" * int(g.prod() // merge), 1)
    clips = [load_video(v, VideoSettings.from_dict(VIDEO), image_processor) for v in videos]
    grids = torch.from_numpy(np.concatenate([g for _, g, _ in clips]))
    inputs.update(pixel_values_videos=torch.from_numpy(np.concatenate([p for p, _, _ in clips])), video_grid_thw=grids)
    for g in grids:
        text = text.replace("<|video_pad|>", "<|placeholder_v|>" * int(g.prod() // merge), 1)
    text = text.replace("<|placeholder_i|>", "<|image_pad|>").replace("<|placeholder_v|>", "<|video_pad|>")
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    image, video = (tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>"))
    inputs.update(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=((ids == image).int() + 2 * (ids == video).int()))
    return inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from checkpoint.convert import convert_hf_to_mm
    from scripts.make_tiny_clips import make_clip

    root = tmp_path_factory.mktemp("inference_video")
    hf_dir, model, images, _ = hf_world(root)
    clips = {"left.mp4": make_clip(str(root / "left.mp4"), "left", width=96, height=64, frames=12, fps=6.0, seed=1),
             "up.mp4": make_clip(str(root / "up.mp4"), "up", width=64, height=96, frames=9, fps=3.0, seed=2)}
    with open(root / "videos.json", "w") as f:
        json.dump(RECORDS, f)
    convert_hf_to_mm(hf_dir, str(root / "tp2"), tensor_parallel_size=2, progress=False)
    tokenizer, processor = AutoTokenizer.from_pretrained(hf_dir), Qwen2VLImageProcessor.from_pretrained(hf_dir)
    expected = []
    for r in RECORDS:
        history = r["messages"][:1]
        inputs = _hf_inputs(tokenizer, processor, history, [images[p] for p in r.get("images", [])],
                            [clips[p] for p in r["videos"]])
        expected.append(_hf_generate(model, inputs)[0])
    chat = _hf_inputs(tokenizer, processor, [{"role": "user", "content": "<image><video>What moves?"}],
                      [images["tall.png"]], [clips["left.mp4"]])
    return dict(root=root, hf_dir=hf_dir, images=images, clips=clips, expected=expected,
                chat=_hf_generate(model, chat)[0])


def _argv(w, tp, *extra):
    return ["--load", str(w["root"] / "tp2"), "--tokenizer-path", w["hf_dir"], "--device", "cpu",
            "--max-new-tokens", str(NEW), "--stop-token-ids", "--no-stream", "--tensor-model-parallel-size",
            str(tp), *VIDEO_FLAGS, *extra]


def _ids(path):
    with open(path) as f:
        return [json.loads(line)["token_ids"] for line in f]


@pytest.mark.parametrize("tp", [1, 2])
def test_greedy_ids_with_video_equal_hf_generate(world, tp):
    w = world
    chat = ["--image", w["images"]["tall.png"], "--video", w["clips"]["left.mp4"], "--prompt", "What moves?"]
    out = w["root"] / f"videos_tp{tp}.jsonl"
    results = run_ranks(_run_mains, tp, timeout=400, argvs=[
        _argv(w, tp, "--input", str(w["root"] / "videos.json"), "--output", str(out), "--batch-size", "2"),
        _argv(w, tp, *chat)])[0]
    assert _ids(out) == w["expected"]  # the two records left-padded into one batch
    assert results[1]["token_ids"] == w["chat"]  # no <video> in --prompt: the clip after the image, first


def test_video_mistakes_are_one_line(world, tmp_path, capsys):
    from inference_qwen2vl import main
    from mindspeed_mm.errors import cli_main

    entry = cli_main(main)

    w = world
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(bytes(range(256)) * 8)
    cases = [
        (["--video", str(tmp_path / "gone.mp4"), "--prompt", "Hi"], "gone.mp4"),
        (["--video", str(junk), "--prompt", "Hi"], "corrupt_video"),
        (["--video", w["clips"]["left.mp4"], "--prompt", "<video><video>Two?"], "2 '<video>' but 1 --video"),
        (["--video-fps", "0", "--prompt", "Hi"], "video_fps must be > 0"),
    ]
    for extra, words in cases:
        argv = ["--load", str(w["root"] / "tp2"), "--tokenizer-path", w["hf_dir"], "--device", "cpu", *extra]
        with pytest.raises(SystemExit) as stop:
            entry(argv)
        err = capsys.readouterr().err.strip()
        assert stop.value.code == 2 and err.startswith("error: ") and words in err and "\n" not in err, err
