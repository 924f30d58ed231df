"""A dataset mixing valid samples with every bad case: loading completes, the valid samples
are exactly the ones kept, each drop is counted under its reason; plus the cache."""

import json
import os

import pytest
import torch

from mindspeed_mm.data.builder import NoUsableSamplesError, build_dataloader, build_train_valid_datasets
from mindspeed_mm.data.config import data_config_from_dict
from mindspeed_mm.jsonio import DataFileError
from tests.data_fixtures import data_config, make_processor_dir, save_image, write_json


def _rec(images, *turns, **extra):
    return {"images": images, "messages": [{"role": r, "content": c} for r, c in turns], **extra}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    model_dir = make_processor_dir(str(root / "tiny"))
    img = root / "img"
    img.mkdir()
    save_image(img / "ok.jpg", 100, 80)
    save_image(img / "small.png", 20, 12)          # under 28 px: HF scales it up, kept
    save_image(img / "thin.png", 600, 2)           # aspect 300 > 200: HF refuses, dropped
    (img / "garbage.jpg").write_bytes(b"not an image at all")
    full = (img / "ok.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(full[: len(full) // 2])
    return root, model_dir


def _dataset(root):
    ok = "img/ok.jpg"  # relative: resolved against dataset_dir
    long_text = "word " * 300
    valid = [
        _rec([ok], ("user", "<image>\nDescribe."), ("assistant", "A noisy picture.")),
        _rec([], ("user", "Hello"), ("assistant", "Hi there.")),
        _rec(["img/small.png"], ("user", "What is this <image>?"), ("assistant", "A small image.")),
        _rec([ok], ("system", "Be brief."), ("user", "<image>Colour?"), ("assistant", "Grey.")),
        # longer than cutoff_len, but the cut only removes answer text: kept, truncated
        _rec([ok], ("user", "<image>\nTell me a long story."), ("assistant", long_text)),
    ]
    bad = {
        "missing_image": _rec(["img/nope.jpg"], ("user", "<image>"), ("assistant", "x")),
        "corrupt_image": _rec(["img/garbage.jpg"], ("user", "<image>"), ("assistant", "x")),
        "bad_aspect_ratio": _rec(["img/thin.png"], ("user", "<image>"), ("assistant", "x")),
        "image_count_mismatch": _rec([ok, ok], ("user", "<image> only one"), ("assistant", "x")),
        "unknown_role": _rec([], ("user", "a"), ("robot", "b")),
        "bad_conversation": _rec([], ("assistant", "a"), ("user", "b")),
        "too_long": _rec([ok], ("user", long_text + "<image>"), ("assistant", "x")),
        "bad_record": "just a string",
    }
    extra = [  # second example of some reasons
        ("corrupt_image", _rec(["img/truncated.jpg"], ("user", "<image>"), ("assistant", "x"))),
        ("bad_conversation", _rec([], ("user", "a"))),
        ("bad_conversation", {"images": [], "messages": []}),
        ("too_long", _rec([], ("user", long_text), ("assistant", "x"))),  # no supervised token left
    ]
    records = valid + list(bad.values()) + [r for _, r in extra]
    text = json.dumps(records)
    # non-UTF-8 bytes inside one sample's text: that sample goes, the file still loads
    text = text[:-1] + ', {"images": [], "messages": [{"role": "user", "content": "caf@@"}, ' \
                       '{"role": "assistant", "content": "ok"}]}]'
    raw = text.encode().replace(b"@@", b"\xe9\xff")
    path = root / "mixed.json"
    path.write_bytes(raw)
    counts = {r: 1 for r in bad}
    for r, _ in extra:
        counts[r] += 1
    counts["bad_text"] = 1
    return str(path), valid, counts


def _config(root, model_dir, dataset, **basic):
    basic.setdefault("cutoff_len", 200)
    return data_config_from_dict(data_config(model_dir, dataset, str(root / "cache"), str(root), **basic))


def test_bad_samples_are_dropped_and_counted(env):
    root, model_dir = env
    path, valid, counts = _dataset(root)
    logs = []
    cfg = _config(root, model_dir, path, preprocessing_num_workers=2)
    ds, valid_ds = build_train_valid_datasets(cfg, progress=False, log=logs.append)
    assert valid_ds is None
    assert ds.cache.meta["drop_counts"] == counts
    assert logs[-len(counts) - 1].startswith(f"data: {len(valid)} usable samples of {len(valid) + sum(counts.values())}")
    assert any("(bad_aspect_ratio), e.g." in m and "mixed.json[" in m for m in logs)

    # Kept samples are exactly the valid ones, in order: check by re-building them alone.
    only_valid = write_json(root / "valid.json", valid)
    ref, _ = build_train_valid_datasets(_config(root, model_dir, only_valid), progress=False, log=lambda m: None)
    assert len(ds) == len(ref) == len(valid)
    for i in range(len(valid)):
        assert torch.equal(ds[i]["input_ids"], ref[i]["input_ids"])
    assert len(ds[4]["input_ids"]) == 200  # the long story was truncated, not dropped

    # Training data loading runs through every kept sample.
    loader = iter(build_dataloader(ds, cfg, seed=5, pin_memory=False))
    seen = 0
    for _ in range(3):
        batch = next(loader)
        seen += batch["input_ids"].shape[0]
        n_pad = (batch["input_ids"] == ds.ids.image_token_id).sum()
        merge = ds.ids.spatial_merge_size ** 2
        grid = batch["image_grid_thw"]
        assert n_pad == (0 if grid is None else grid.prod(-1).sum() // merge)
    assert seen == 6  # 5 samples, drop_last=False tops up the last batch


def test_nothing_usable_is_a_clear_error(env, tmp_path):
    root, model_dir = env
    path = write_json(tmp_path / "bad.json", [_rec(["img/nope.jpg"], ("user", "<image>"), ("assistant", "x"))])
    with pytest.raises(NoUsableSamplesError, match="no usable training sample.*missing_image"):
        build_train_valid_datasets(_config(root, model_dir, path), progress=False, log=lambda m: None)


def test_malformed_data_file(env, tmp_path):
    root, model_dir = env
    bad = tmp_path / "broken.json"
    bad.write_text('[{"images": [],\n "messages": [}]')
    with pytest.raises(DataFileError, match=r"broken.json: line 2, column 15"):
        build_train_valid_datasets(_config(root, model_dir, str(bad)), progress=False, log=lambda m: None)
    with pytest.raises(DataFileError, match="dataset: file 'missing.json' not found"):
        build_train_valid_datasets(_config(root, model_dir, "missing.json"), progress=False, log=lambda m: None)


def test_cache_reused_rebuilt_and_keyed(env, tmp_path):
    root, model_dir = env
    data = write_json(tmp_path / "d.json", [_rec(["img/ok.jpg"], ("user", "<image>hi"), ("assistant", "yo"))])
    cfg = _config(root, model_dir, data)
    first, _ = build_train_valid_datasets(cfg, progress=False, log=lambda m: None)
    logs = []
    again, _ = build_train_valid_datasets(cfg, progress=False, log=logs.append)
    assert again.cache.path == first.cache.path and any("reusing" in m for m in logs)
    assert again.cache.meta["created"] == first.cache.meta["created"]
    rebuilt, _ = build_train_valid_datasets(_config(root, model_dir, data, overwrite_cache=True),
                                            progress=False, log=lambda m: None)
    assert rebuilt.cache.path == first.cache.path
    assert rebuilt.cache.meta["created"] > first.cache.meta["created"]
    other, _ = build_train_valid_datasets(_config(root, model_dir, data, cutoff_len=100),
                                          progress=False, log=lambda m: None)
    assert other.cache.path != first.cache.path
    assert len([d for d in os.listdir(root / "cache") if not d.startswith(".")
                and not d.endswith(".lock")]) >= 2
