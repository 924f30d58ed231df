"""Records with video clips through preprocessing, the cache, the dataset and both collators, against
Hugging Face's processing: the chat template's video block, <|video_pad|> runs of HF's length,
mm_token_type_ids 2, and HF's get_rope_index positions for videos beside images.  Bad clips are
dropped with counted reasons; bad video keys in data.json are one line naming the key."""

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2VLImageProcessor

from mindspeed_mm.data.builder import build_train_valid_datasets
from mindspeed_mm.data.collate import PackedCollator, Qwen2VLCollator
from mindspeed_mm.data.config import DataConfigError, data_config_from_dict
from mindspeed_mm.data.video import VideoSettings, load_video
from scripts.make_tiny_clips import make_clip
from tests.data_fixtures import MAX_PIXELS, MIN_PIXELS, data_config, hf_messages, make_processor_dir, save_image, \
    write_json

U, A = "user", "assistant"
# Small frames and few of them: tests stay fast; the sampling rules themselves are tests/test_data_video.py's.
VIDEO_KEYS = dict(video_fps=4.0, video_min_frames=2, video_max_frames=8, video_min_pixels=28 * 28,
                  video_max_pixels=56 * 84)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_records")
    model_dir = make_processor_dir(str(root / "tiny"))
    clips = [make_clip(str(root / "left.mp4"), "left", width=96, height=64, frames=12, fps=6.0, seed=1),
             make_clip(str(root / "up.mp4"), "up", width=64, height=96, frames=9, fps=3.0, seed=2)]
    image = save_image(root / "a.png", 84, 56, seed=3)
    return root, model_dir, clips, image


def _config(env, name, records, **basic):
    root, model_dir, _, _ = env
    data = write_json(root / f"{name}.json", records)
    cfg = data_config(model_dir, data, str(root / f"cache-{name}"), **basic)
    cfg["dataset_param"]["preprocess_parameters"].update(VIDEO_KEYS)
    return data_config_from_dict(cfg)


def _dataset(env, name, records, **basic):
    lines = []
    ds, _ = build_train_valid_datasets(_config(env, name, records, **basic), progress=False, log=lines.append)
    return ds, lines


def _processors(model_dir):
    return (AutoTokenizer.from_pretrained(model_dir),
            Qwen2VLImageProcessor.from_pretrained(model_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))


def _hf_reference(tok, ip, messages, images, videos):
    """HF's text: the chat template with image / video items, each pad repeated as Qwen2VLProcessor does
    (video grids from data/video.py, checked against HF's own functions in tests/test_data_video.py)."""
    text = tok.apply_chat_template(hf_messages(messages), tokenize=False)
    merge = ip.merge_size ** 2
    out = {"image_grid_thw": None, "pixel_values": None, "video_grid_thw": None, "pixel_values_videos": None}
    if images:
        from PIL import Image

        px = ip(images=[Image.open(p) for p in images], return_tensors="pt")
        out.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        pieces = text.split("<|image_pad|>")
        text = pieces[0] + "".join("<|image_pad|>" * int(g.prod() // merge) + p
                                   for g, p in zip(px["image_grid_thw"], pieces[1:]))
    if videos:
        clips = [load_video(v, VideoSettings.from_dict(VIDEO_KEYS), ip) for v in videos]
        grids = torch.from_numpy(np.concatenate([g for _, g, _ in clips]))
        out.update(pixel_values_videos=torch.from_numpy(np.concatenate([p for p, _, _ in clips])), video_grid_thw=grids)
        pieces = text.split("<|video_pad|>")
        text = pieces[0] + "".join("<|video_pad|>" * int(g.prod() // merge) + p for g, p in zip(grids, pieces[1:]))
    out["input_ids"] = torch.tensor(tok(text)["input_ids"])
    return out


@pytest.fixture(scope="module")
def hf_rope(env):
    """HF's Qwen2VLModel.get_rope_index (tiny random weights, never run)."""
    from transformers import Qwen2VLModel

    from scripts.make_tiny_qwen2vl import special_token_ids, tiny_config

    tok, _ = _processors(env[1])
    ids = special_token_ids(tok)
    cfg = tiny_config(num_hidden_layers=1, image_token_id=ids["image_token_id"], video_token_id=ids["video_token_id"],
                      vision_start_token_id=ids["vision_start_token_id"],
                      vision_end_token_id=ids["vision_end_token_id"], vision_config={"depth": 1})
    return Qwen2VLModel(cfg).eval().get_rope_index


def _cases(clips, image):
    return {
        "video": ([], [clips[0]], [(U, "<video>\nWhich way does the square move?"), (A, "left")]),
        "image_and_video": ([image], [clips[1]], [(U, "<image> and <video>: what moves?"), (A, "A square, up."),
                                                  (U, "Sure?"), (A, "Yes.")]),
        "two_videos": ([], clips, [(U, "<video><video>Compare."), (A, "Left, then up.")]),
        "video_then_image": ([image], [clips[0]], [(U, "<video>"), (A, "left"), (U, "<image>?"), (A, "a picture")]),
    }


@pytest.mark.parametrize("name", ["video", "image_and_video", "two_videos", "video_then_image"])
def test_video_sample_matches_hf(env, hf_rope, name):
    images, videos, turns = _cases(env[2], env[3])[name]
    messages = [{"role": r, "content": c} for r, c in turns]
    ds, _ = _dataset(env, name, [{"images": images, "videos": videos, "messages": messages}])
    assert len(ds) == 1
    sample = ds[0]
    tok, ip = _processors(env[1])
    ref = _hf_reference(tok, ip, messages, images, videos)

    assert sample["input_ids"].tolist() == ref["input_ids"].tolist()
    for key in ("image_grid_thw", "pixel_values", "video_grid_thw", "pixel_values_videos"):
        if ref[key] is None:
            assert sample[key] is None, key
        else:
            assert torch.equal(sample[key], ref[key].to(sample[key].dtype)), key
    ids = ref["input_ids"]
    mm = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).long() + 2 * (ids == tok.convert_tokens_to_ids("<|video_pad|>")).long()
    assert torch.equal(sample["mm_token_type_ids"], mm)
    pos, _ = hf_rope(ids[None], mm[None], image_grid_thw=ref["image_grid_thw"], video_grid_thw=ref["video_grid_thw"])
    assert torch.equal(sample["position_ids"], pos[:, 0])
    # Vision tokens are never targets; the answers are.
    labels = sample["labels"]
    assert tok.decode(labels[labels != -100]) == "".join(c + "<|im_end|>\n" for r, c in turns if r == A)


def test_collators_and_packing_sizes_carry_videos(env):
    clips, image = env[2], env[3]
    records = [{"videos": [clips[0]], "messages": [{"role": U, "content": "<video>Where?"}, {"role": A, "content": "left"}]},
               {"images": [image], "messages": [{"role": U, "content": "<image>What?"}, {"role": A, "content": "noise"}]},
               {"images": [image], "videos": [clips[1]],
                "messages": [{"role": U, "content": "<video><image>Both?"}, {"role": A, "content": "up"}]}]
    ds, _ = _dataset(env, "collate", records)
    items = [ds[i] for i in range(3)]
    lengths, patches = ds.sample_sizes()
    for item, n, p in zip(items, lengths, patches):
        assert len(item["input_ids"]) == n
        vision = [item[k] for k in ("image_grid_thw", "video_grid_thw") if item[k] is not None]
        assert p == sum(int(g.prod(-1).sum()) for g in vision)
    for batch in (Qwen2VLCollator(0)(items), PackedCollator(0)(items)):
        assert torch.equal(batch["pixel_values_videos"], torch.cat([items[0]["pixel_values_videos"],
                                                                    items[2]["pixel_values_videos"]]))
        assert torch.equal(batch["video_grid_thw"], torch.cat([items[0]["video_grid_thw"], items[2]["video_grid_thw"]]))
        assert torch.equal(batch["image_grid_thw"], torch.cat([items[1]["image_grid_thw"], items[2]["image_grid_thw"]]))


def test_bad_clips_are_dropped_with_counted_reasons(env):
    root, _, clips, _ = env
    junk = root / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    ok = {"videos": [clips[0]], "messages": [{"role": U, "content": "<video>Where?"}, {"role": A, "content": "left"}]}
    records = [ok,
               {"videos": [clips[0]], "messages": [{"role": U, "content": "No placeholder"}, {"role": A, "content": "x"}]},
               {"videos": [str(root / "gone.mp4")], "messages": ok["messages"]},
               {"videos": [str(junk)], "messages": ok["messages"]}]
    ds, lines = _dataset(env, "bad", records)
    assert len(ds) == 1
    text = "\n".join(lines)
    for reason in ("video_count_mismatch", "missing_video", "corrupt_video"):
        assert f"dropped 1 ({reason})" in text, text
    # A clip whose tokens do not fit cutoff_len: video_too_long, with what to lower.
    with pytest.raises(Exception) as e:
        _dataset(env, "too_long", [ok], cutoff_len=20)
    assert "video_too_long" in str(e.value)


@pytest.mark.parametrize("key,value,words", [("video_fps", 0, "must be > 0"),
                                             ("video_max_frames", 1, "video_min_frames"),
                                             ("video_total_pixels", -5, "integer >= 1")])
def test_bad_video_keys_are_one_line(env, key, value, words):
    root, model_dir, _, _ = env
    cfg = data_config(model_dir, write_json(root / "x.json", []), str(root / "c"))
    cfg["dataset_param"]["preprocess_parameters"][key] = value
    with pytest.raises(DataConfigError) as e:
        data_config_from_dict(cfg, source="data.json")
    msg = str(e.value)
    assert f"dataset_param.preprocess_parameters.{key}" in msg and words in msg and "\n" not in msg
