"""Our tokens, labels, pixels and positions against Hugging Face's Qwen2-VL processing."""

import pytest
import torch
from transformers import AutoTokenizer, Qwen2VLImageProcessor

from mindspeed_mm.data.builder import build_train_valid_datasets
from mindspeed_mm.data.config import data_config_from_dict
from tests.data_fixtures import MAX_PIXELS, MIN_PIXELS, data_config, hf_reference, make_processor_dir, \
    save_image, write_json

U, A, S = "user", "assistant", "system"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    model_dir = make_processor_dir(str(root / "tiny"))
    imgs = [save_image(root / "a.jpg", 130, 90, seed=1), save_image(root / "b.png", 60, 60, seed=2),
            save_image(root / "c.jpg", 20, 20, seed=3)]  # c: under 28 px, HF scales it up
    return root, model_dir, imgs


def _msgs(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def cases(imgs):
    return {
        "multi_turn": ([imgs[0]], _msgs((U, "What colour is the umbrella?\n<image>"), (A, "Bright yellow."),
                                        (U, "Is it raining?"), (A, " Probably,\n\nthe street is wet."))),
        "multi_image": ([imgs[0], imgs[1], imgs[2]],
                        _msgs((U, "<image><image>\nCompare these two."), (A, "The first is larger."),
                              (U, "And this one? <image>"), (A, "A tiny one."))),
        "text_only": ([], _msgs((U, "Tell me a joke about trains."), (A, "Why was the train late?"))),
        "system_prompt": ([imgs[1]], _msgs((S, "You answer in one word."), (U, "<image>\nAnimal?"),
                                           (A, "Giraffe"))),
    }


def _load(env, name, **basic):
    root, model_dir, imgs = env
    images, messages = cases(imgs)[name]
    data = write_json(root / f"{name}.json", [{"images": images, "messages": messages}])
    cfg = data_config_from_dict(data_config(model_dir, data, str(root / f"cache-{name}"), **basic))
    ds, _ = build_train_valid_datasets(cfg, progress=False, log=lambda m: None)
    assert len(ds) == 1
    return ds[0], images, messages


def _processors(model_dir):
    return (AutoTokenizer.from_pretrained(model_dir),
            Qwen2VLImageProcessor.from_pretrained(model_dir, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))


@pytest.fixture(scope="module")
def hf_model(env):
    """HF's own Qwen2VLModel, for its get_rope_index (tiny random weights, never run)."""
    from transformers import Qwen2VLModel

    from scripts.make_tiny_qwen2vl import special_token_ids, tiny_config

    tok, _ = _processors(env[1])
    ids = special_token_ids(tok)
    cfg = tiny_config(num_hidden_layers=1, image_token_id=ids["image_token_id"],
                      video_token_id=ids["video_token_id"], vision_start_token_id=ids["vision_start_token_id"],
                      vision_end_token_id=ids["vision_end_token_id"], vision_config={"depth": 1})
    return Qwen2VLModel(cfg).eval()


@pytest.mark.parametrize("name", ["multi_turn", "multi_image", "text_only", "system_prompt"])
def test_matches_hf(env, hf_model, name):
    sample, images, messages = _load(env, name)
    tok, ip = _processors(env[1])
    ref = hf_reference(tok, ip, messages, images)

    assert sample["input_ids"].tolist() == ref["input_ids"].tolist()
    if images:
        assert torch.equal(sample["image_grid_thw"], ref["image_grid_thw"])
        assert torch.equal(sample["pixel_values"], ref["pixel_values"])
    else:
        assert sample["pixel_values"] is None and sample["image_grid_thw"] is None
    mm = (ref["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).long()
    assert torch.equal(sample["mm_token_type_ids"], mm)

    # Labels: exactly the assistant turns' content + "<|im_end|>\n", in turn order.
    labels = sample["labels"]
    assert torch.equal(labels[labels != -100], sample["input_ids"][labels != -100])
    answers = "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == A)
    assert tok.decode(labels[labels != -100]) == answers
    runs = (torch.diff((labels != -100).int()) == 1).sum().item()
    assert runs == sum(m["role"] == A for m in messages)

    ids = ref["input_ids"][None]
    pos, _ = hf_model.get_rope_index(ids, mm[None], image_grid_thw=ref["image_grid_thw"])
    assert torch.equal(sample["position_ids"], pos[:, 0])


def test_mask_history_supervises_last_answer_only(env):
    sample, _, messages = _load(env, "multi_turn", mask_history=True)
    tok, _ = _processors(env[1])
    labels = sample["labels"]
    assert tok.decode(labels[labels != -100]) == messages[-1]["content"] + "<|im_end|>\n"


def test_train_on_prompt_supervises_text_not_images(env):
    sample, _, _ = _load(env, "multi_image", train_on_prompt=True)
    tok, _ = _processors(env[1])
    vision = torch.isin(sample["input_ids"], torch.tensor(tok.convert_tokens_to_ids(
        ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"])))
    assert (sample["labels"][vision] == -100).all()
    assert torch.equal(sample["labels"][~vision], sample["input_ids"][~vision])
