"""Inference front end without a model: prompts equal HF's chat template with the generation prompt,
batch files give the history and the reference, flags and the inference JSON merge, bad input is one line."""
import json

import pytest
import torch
from PIL import Image

from mindspeed_mm.errors import UserError
from mindspeed_mm.inference.arguments import parse_args
from mindspeed_mm.inference.prompts import PromptBuilder, chat_conversation, read_conversations
from mindspeed_mm.inference.stream import StreamPrinter
from tests.data_fixtures import hf_messages, make_processor_dir, save_image


def hf_generation_inputs(tokenizer, image_processor, messages, image_paths):
    """What Qwen2VLProcessor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    gives for MLLM-format ``messages`` (ending with a user turn): input_ids [1, s], pixels, grids."""
    text = tokenizer.apply_chat_template(hf_messages(messages), add_generation_prompt=True, tokenize=False)
    out = {"pixel_values": None, "image_grid_thw": None}
    if image_paths:
        px = image_processor(images=[Image.open(p) for p in image_paths], return_tensors="pt")
        out.update(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        counts = iter((px["image_grid_thw"].prod(-1) // image_processor.merge_size ** 2).tolist())
        while "<|image_pad|>" in text:  # the processor's expansion: one pad per merged patch
            text = text.replace("<|image_pad|>", "<|placeholder|>" * next(counts), 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
    out["input_ids"] = torch.tensor([tokenizer(text)["input_ids"]])
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    root = tmp_path_factory.mktemp("prompts")
    hf_dir = make_processor_dir(str(root / "hf"))
    images = [save_image(root / "wide.png", 84, 56, seed=1), save_image(root / "tall.png", 56, 112, seed=2)]
    return dict(root=root, hf_dir=hf_dir, images=images, tokenizer=AutoTokenizer.from_pretrained(hf_dir),
                image_processor=Qwen2VLImageProcessor.from_pretrained(hf_dir))


def _builder(tiny, max_length=4096):
    return PromptBuilder(tiny["tokenizer"], tiny["image_processor"], max_length)


@pytest.mark.parametrize("n_images", [0, 1, 2])
@pytest.mark.parametrize("system", [None, "Answer in one word."])
def test_chat_prompt_is_hf_chat_template(tiny, n_images, system):
    images = tiny["images"][:n_images]
    prompt = _builder(tiny).build(chat_conversation("What is shown here?", images, system), "--prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": "<image>" * n_images + "What is shown here?"}]
    ref = hf_generation_inputs(tiny["tokenizer"], tiny["image_processor"], messages, images)
    assert prompt.input_ids == ref["input_ids"][0].tolist()
    batch = _builder(tiny).batch([prompt])
    if n_images:
        assert torch.equal(batch.image_grid_thw, ref["image_grid_thw"])
        assert torch.equal(batch.pixel_values, ref["pixel_values"])
        assert len(set(map(tuple, ref["image_grid_thw"].tolist()))) == n_images  # sizes differ
    else:
        assert batch.pixel_values is None and batch.image_grid_thw is None


def test_batch_file_history_and_reference(tiny, tmp_path):
    wide, tall = tiny["images"]
    records = [
        {"messages": [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": "A box."}],
         "images": [wide]},
        {"messages": [{"role": "user", "content": "Hi<image>"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "And this<image>?"}], "images": [wide, tall]},
    ]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(records))
    convs = read_conversations(str(path))
    assert [ref for _, ref in convs] == ["A box.", None]
    builder = _builder(tiny)
    for (conv, ref), record in zip(convs, records):
        prompt = builder.build(conv, "sample", ref)
        history = record["messages"][:-1] if record["messages"][-1]["role"] == "assistant" else record["messages"]
        expect = hf_generation_inputs(tiny["tokenizer"], tiny["image_processor"], history, record["images"])
        assert prompt.input_ids == expect["input_ids"][0].tolist()
        assert prompt.text == history[-1]["content"]


def test_bad_inputs_name_the_sample(tiny, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([
        {"messages": [{"role": "user", "content": "fine"}]},
        {"messages": [{"role": "user", "content": "<image>x"}], "images": ["nowhere.png"]},
    ]))
    with pytest.raises(UserError, match=r"sample 1: .*nowhere.png'? not found"):  # when read or when built
        convs = read_conversations(str(path))
        [_builder(tiny).build(conv, f"{path}: sample {i}") for i, (conv, _) in enumerate(convs)]
    path.write_text(json.dumps([{"messages": [{"role": "user", "content": "<image>x"}], "images": []}]))
    with pytest.raises(UserError, match=r"sample 0: .*placeholders"):
        read_conversations(str(path))
    with pytest.raises(UserError, match="--prompt has 1 '<image>' but 0 --image given"):
        chat_conversation("look <image>", [])
    with pytest.raises(UserError, match="--prompt: must not contain the vision tokens"):
        chat_conversation("look <|image_pad|>", [])
    with pytest.raises(UserError, match="the prompt is .* tokens, the model takes at most 8"):
        _builder(tiny, max_length=8).build(chat_conversation("hello", []), "--prompt")


def test_flags_win_over_the_json(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    config = tmp_path / "inference.json"
    config.write_text(json.dumps({"load": str(ckpt), "tokenizer_path": tiny["hf_dir"],
                                  "generation": {"max_new_tokens": 7, "top_k": 3,
                                                 "stop_token_ids": [151645, 151643]}}))
    args = parse_args(["--config", str(config), "--prompt", "hi", "--max-new-tokens", "9", "--do-sample"])
    g = args.generation
    assert (args.load, g.max_new_tokens, g.top_k, g.do_sample, g.stop_token_ids) == \
           (str(ckpt), 9, 3, True, [151645, 151643])
    assert parse_args(["--config", str(config), "--prompt", "hi", "--stop-token-ids"]).generation.stop_token_ids == []
    bad = [(["--prompt", "hi", "--input", "x.json", "--output", "y"], "either --prompt"),
           (["--input", "x.json"], "--input needs --output"),
           (["--prompt", "hi", "--temperature", "0"], "temperature"),
           (["--prompt", "hi", "--load", str(tmp_path / "missing")], "directory not found")]
    for extra, message in bad:
        with pytest.raises(UserError, match=message):
            parse_args(["--config", str(config)] + extra)
    config.write_text(json.dumps({"load": str(ckpt), "generation": {"max_tokens": 3}}))
    with pytest.raises(UserError, match="unknown key 'generation.max_tokens'"):
        parse_args(["--config", str(config), "--prompt", "hi"])
    config.write_text(json.dumps({"load": str(ckpt), "generation": {"do_sample": "yes"}}))
    with pytest.raises(UserError, match="'do_sample' must be bool"):
        parse_args(["--config", str(config), "--prompt", "hi"])


def test_stream_prints_whole_characters(tiny):
    import io

    tok = tiny["tokenizer"]
    text = "Zwei Äpfel, 你好 ok\nnext line — done"
    ids = tok(text)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    out = io.StringIO()
    printer = StreamPrinter(tok, out)
    seen = []
    for t in ids:
        printer.push(t)
        seen.append(out.getvalue())
    printer.end()
    assert out.getvalue() == text + "\n"
    assert not any("\ufffd" in s for s in seen)
    assert len(set(seen)) > 5  # it really streamed
