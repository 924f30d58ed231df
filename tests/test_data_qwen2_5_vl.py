"""The data path on a Qwen2.5-VL folder: same tokens and pixels as Qwen2-VL's, and M-RoPE positions with
absolute video time equal to HF's ``Qwen2_5_VLModel.get_rope_index`` fed the processor's
``second_per_grid_ts`` (temporal_patch_size / sampled fps of each clip)."""
import numpy as np
import pytest
import torch

from mindspeed_mm.data.builder import build_train_valid_datasets
from mindspeed_mm.data.config import VideoSettings, data_config_from_dict
from mindspeed_mm.data.positions import tokens_per_second_of
from mindspeed_mm.data.video import load_video
from scripts.make_tiny_clips import make_clip
from tests.data_fixtures import MAX_PIXELS, MIN_PIXELS, data_config, save_image, write_json

VIDEO_KEYS = dict(video_fps=1.0, video_min_frames=4, video_max_frames=8, video_min_pixels=28 * 28,
                  video_max_pixels=56 * 84)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from scripts.make_tiny_qwen2vl import make_tiny_qwen2vl

    root = tmp_path_factory.mktemp("qwen2_5_vl_data")
    make_tiny_qwen2vl(str(root / "tiny25"), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, family="qwen2_5_vl")
    make_tiny_qwen2vl(str(root / "tiny2"), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    clip = make_clip(str(root / "right.mp4"), "right", width=96, height=64, frames=20, fps=10.0, seed=4)
    image = save_image(root / "a.png", 84, 56, seed=3)
    record = {"images": [image], "videos": [clip],
              "messages": [{"role": "user", "content": "<image>Then <video>: which way?"},
                           {"role": "assistant", "content": "right"}]}
    return root, record, clip


def _item(root, folder, record):
    cfg = data_config(str(root / folder), write_json(root / f"{folder}.json", [record]), str(root / f"cache-{folder}"))
    cfg["dataset_param"]["preprocess_parameters"].update(VIDEO_KEYS)
    ds, _ = build_train_valid_datasets(data_config_from_dict(cfg), progress=False, log=lambda m: None)
    return ds[0]


def test_positions_use_absolute_video_time_as_hf(env):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    root, record, clip = env
    folder = str(root / "tiny25")
    assert tokens_per_second_of(folder) == 2.0 and tokens_per_second_of(str(root / "tiny2")) is None
    sample = _item(root, "tiny25", record)
    tok, ip = AutoTokenizer.from_pretrained(folder), Qwen2VLImageProcessor.from_pretrained(folder)
    _, grid, sampling = load_video(clip, VideoSettings.from_dict(VIDEO_KEYS), ip)
    assert torch.equal(sample["video_grid_thw"], torch.from_numpy(grid))
    ids = sample["input_ids"]
    mm = (ids == tok.convert_tokens_to_ids("<|image_pad|>")).int() + 2 * (ids == tok.convert_tokens_to_ids("<|video_pad|>")).int()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).model
    seconds = torch.tensor([ip.temporal_patch_size / sampling.sampled_fps])
    want, _ = hf.get_rope_index(ids[None], mm[None], image_grid_thw=sample["image_grid_thw"],
                                video_grid_thw=sample["video_grid_thw"], second_per_grid_ts=seconds)
    assert torch.equal(sample["position_ids"], want[:, 0])
    # The same record on a Qwen2-VL folder: same tokens and pixels, video time in temporal patches.
    other = _item(root, "tiny2", record)
    assert torch.equal(other["input_ids"], ids) and torch.equal(other["pixel_values_videos"], sample["pixel_values_videos"])
    video = (ids == tok.convert_tokens_to_ids("<|video_pad|>")).numpy()
    assert not np.array_equal(other["position_ids"][0, video].numpy(), sample["position_ids"][0, video].numpy())
