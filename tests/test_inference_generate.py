"""KV-cached generation equals Hugging Face's greedy ``generate`` token for token.

A tiny random HF Qwen2-VL (tests/hf_reference.py) is saved with a tokenizer
and image processor and converted with the project's converter: once at
TP=2 (``release``) and once as a training-style save (TP=1 x PP=2,
``iter_0000003``).  Our inference entry point (the same ``main`` the
launcher runs) then answers an MLLM file of three prompts (one image + text,
two images of different sizes + text, text only) and single chats, at TP=1
and TP=2 on gloo processes, loading each checkpoint at a TP it was not saved
with too.  Expected ids come from ``Qwen2VLForConditionalGeneration.generate
(do_sample=False)`` on the same weights: one prompt at a time, and the
three left-padded together for our batched run.
"""
import json
import os
import shutil

import pytest
import torch

from tests.data_fixtures import save_image
from tests.multiproc import free_port, run_ranks
from tests.test_inference_prompts import hf_generation_inputs

NEW = 16
RECORDS = [
    {"messages": [{"role": "user", "content": "<image>Describe the picture."},
                  {"role": "assistant", "content": "A wide picture."}], "images": ["wide.png"]},
    {"messages": [{"role": "user", "content": "<image><image>Compare the two pictures."}],
     "images": ["wide.png", "tall.png"]},
    {"messages": [{"role": "user", "content": "Tell me about the kitchen."},
                  {"role": "assistant", "content": "It has a table."}]},
]


def _hf_generate(model, inputs, **kwargs):
    """New token ids per sample, cut after the first eos like our answers (eos included)."""
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=2048, **kwargs)
    eos = kwargs.get("eos_token_id")
    answers = []
    for row in out[:, n:].tolist():
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        answers.append(row)
    return answers


def _hf_inputs(parts, image_token_id):
    """One left-padded HF batch from single-prompt inputs (the processor's padding_side='left')."""
    from mindspeed_mm.inference.generate import left_pad

    ids, mask = left_pad([p["input_ids"][0].tolist() for p in parts], 2048)
    batch = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == image_token_id).int())
    with_images = [p for p in parts if p["pixel_values"] is not None]
    if with_images:
        batch["pixel_values"] = torch.cat([p["pixel_values"] for p in with_images])
        batch["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_images])
    return batch


def sharpen_attention(model, scale=6.0):
    """Scale the LLM's query and key projections: the random model's attention is otherwise so flat
    that wrong decoding positions (rope deltas) or a wrong cache would not change a single token."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(scale)
                proj.bias.mul_(scale)
    return model


def hf_world(root):
    """The tiny HF folder (sharpened attention), two images and eval.json under `root`; returns
    (hf_dir, model, images, per-record HF generation inputs of RECORDS)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from scripts.make_tiny_qwen2vl import make_image_processor, make_tokenizer
    from tests.hf_reference import TOKENS, hf_model

    hf_dir = str(root / "hf")
    model = sharpen_attention(hf_model())
    model.save_pretrained(hf_dir)
    make_tokenizer(hf_dir)
    make_image_processor(hf_dir, 56 * 56, 112 * 112)
    images = {"wide.png": save_image(root / "wide.png", 84, 56, seed=1),
              "tall.png": save_image(root / "tall.png", 56, 112, seed=2)}
    with open(root / "eval.json", "w") as f:
        json.dump(RECORDS, f)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    image_processor = Qwen2VLImageProcessor.from_pretrained(hf_dir)
    parts = []
    for r in RECORDS:
        history = r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"]
        inputs = hf_generation_inputs(tokenizer, image_processor, history, [images[p] for p in r.get("images", [])])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == TOKENS["image_token_id"]).int()
        parts.append(inputs)
    return hf_dir, model, images, parts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from checkpoint.convert import convert_hf_to_mm
    from tests.hf_reference import TOKENS

    root = tmp_path_factory.mktemp("inference")
    hf_dir, model, images, parts = hf_world(root)
    convert_hf_to_mm(hf_dir, str(root / "tp2"), tensor_parallel_size=2, progress=False)
    # A training save: TP=1 x PP=2 at iteration 3 (same weights).
    convert_hf_to_mm(hf_dir, str(root / "trained"), pipeline_num_layers=[1, 2], progress=False)
    shutil.move(str(root / "trained" / "release"), str(root / "trained" / "iter_0000003"))
    (root / "trained" / "latest_checkpointed_iteration.txt").write_text("3\n")

    single = [_hf_generate(model, {k: v for k, v in p.items() if v is not None})[0] for p in parts]
    batched = _hf_generate(model, _hf_inputs(parts, TOKENS["image_token_id"]))
    # A stop id: the first token of answer 0 that differs from the ones before it.
    answer = single[0]
    k = next(i for i in range(1, NEW) if answer[i] not in answer[:i])
    stopped = _hf_generate(model, {k_: v for k_, v in parts[0].items() if v is not None},
                           eos_token_id=answer[k])[0]
    assert stopped == answer[:k + 1] and len(stopped) < NEW
    return dict(root=root, hf_dir=hf_dir, images=images, single=single, batched=batched, stop=answer[k],
                stopped=stopped)


def _run_mains(rank, world, argvs):
    """Our entry point's main, several times in one process group (as torchrun would run it)."""
    from mindspeed_mm.platform import setup_platform

    platform = setup_platform("cpu")
    from mindspeed_mm.inference.main import main
    from mindspeed_mm.platform.distributed import destroy_distributed, init_distributed

    init_distributed(platform, world, 1, seed=1)
    try:
        return [main(argv) for argv in argvs]
    finally:
        destroy_distributed()


def _argv(w, load, *extra):
    return ["--load", str(w["root"] / load), "--tokenizer-path", w["hf_dir"], "--device", "cpu",
            "--max-new-tokens", str(NEW), "--stop-token-ids", "--no-stream",
            "--tensor-model-parallel-size", *extra]


def _batch(w, tp, load, out, batch_size):
    return _argv(w, load, str(tp), "--input", str(w["root"] / "eval.json"), "--output", str(w["root"] / out),
                 "--batch-size", str(batch_size))


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _check_file(w, name, expected):
    lines = _read(w["root"] / name)
    assert [line["index"] for line in lines] == [0, 1, 2]
    assert [line["token_ids"] for line in lines] == expected
    assert [line["reference"] for line in lines] == ["A wide picture.", None, "It has a table."]
    assert lines[1]["prompt"] == "<image><image>Compare the two pictures."
    assert not any(name.startswith(".tmp-") for name in os.listdir(w["root"]))


def test_greedy_equals_hf_generate_tp1(world):
    w = world
    chat = ["--image", w["images"]["wide.png"], "--image", w["images"]["tall.png"],
            "--prompt", "Compare the two pictures."]
    stop = ["--image", w["images"]["wide.png"], "--prompt", "Describe the picture."]
    sample = ["--prompt", "Tell me about the kitchen.", "--do-sample", "--temperature", "1.5"]
    results = run_ranks(_run_mains, 1, timeout=400, argvs=[
        _batch(w, 1, "tp2", "tp1_b1.jsonl", 1),  # saved at TP=2, run at TP=1
        _batch(w, 1, "trained", "tp1_b3.jsonl", 3),  # training save (PP=2, iteration 3), left-padded batch
        _argv(w, "trained", "1", "--iteration", "3", *chat, "--output-json", str(w["root"] / "chat.json")),
        _argv(w, "tp2", "1", *stop, "--stop-token-ids", str(w["stop"])),
        _argv(w, "tp2", "1", *sample, "--seed", "3"),
        _argv(w, "tp2", "1", *sample, "--seed", "3"),
        _argv(w, "tp2", "1", *sample, "--seed", "4"),
    ])[0]
    _check_file(w, "tp1_b1.jsonl", w["single"])
    _check_file(w, "tp1_b3.jsonl", w["batched"])
    with open(w["root"] / "chat.json") as f:
        assert json.load(f) == results[2]
    assert results[2]["token_ids"] == w["single"][1]
    assert results[3]["token_ids"] == w["stopped"]  # stops at the stop id, which is included
    assert results[4] == results[5] and results[4]["token_ids"] != results[6]["token_ids"]
    assert len(results[4]["token_ids"]) == NEW


def test_greedy_equals_hf_generate_tp2(world):
    w = world
    chat = ["--image", w["images"]["wide.png"], "--image", w["images"]["tall.png"],
            "--prompt", "Compare the two pictures."]
    results = run_ranks(_run_mains, 2, timeout=400, argvs=[
        _batch(w, 2, "tp2", "tp2_b1.jsonl", 1),
        _batch(w, 2, "trained", "tp2_b3.jsonl", 3),  # saved at TP=1 x PP=2, run at TP=2
        _argv(w, "tp2", "2", *chat),
        _argv(w, "tp2", "2", "--prompt", "Hi", "--do-sample", "--seed", "3"),
    ])
    _check_file(w, "tp2_b1.jsonl", w["single"])
    _check_file(w, "tp2_b3.jsonl", w["batched"])
    assert results[0][2]["token_ids"] == w["single"][1]
    assert results[0] == results[1]  # both ranks agree, sampling included


def test_bad_input_is_one_line(world, tmp_path, capsys):
    import subprocess
    import sys

    from mindspeed_mm.errors import cli_main
    from mindspeed_mm.inference.main import main

    w = world
    cfg = json.loads((w["root"] / "tp2" / "model.json").read_text())
    small_vocab = dict(cfg, text=dict(cfg["text"], vocab_size=2000))
    short = dict(cfg, text=dict(cfg["text"], max_position_embeddings=12))
    for name, data in (("small_vocab.json", small_vocab), ("short.json", short)):
        (tmp_path / name).write_text(json.dumps(data))
    cases = [
        (["--image", str(tmp_path / "missing.png"), "--prompt", "hi"], "missing.png not found"),
        (["--prompt", "hi", "--mm-model", str(tmp_path / "small_vocab.json")],
         "vocab_size 2000 is smaller than the 2062 tokens"),
        (["--prompt", "hi there", "--mm-model", str(tmp_path / "short.json")], "the model takes at most 12"),
        (["--prompt", "hi", "--iteration", "7"], "iter_0000007/ not found"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli_main(main)(_argv(w, "tp2", "1", *extra))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    # the entry script itself: a checkpoint that is not there
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "inference_qwen2vl.py"), "--load",
                           str(tmp_path / "nothing"), "--tokenizer-path", w["hf_dir"], "--prompt", "hi"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: --load {tmp_path / 'nothing'}: directory not found"


def test_launcher_env_and_extra_flags_win(world):
    """The guide-style launcher: environment overrides the JSON, extra flags override both."""
    import subprocess

    w = world
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = w["root"] / "launcher.json"
    env = dict(os.environ, LOAD_PATH=str(w["root"] / "tp2"), TOKENIZER_PATH=w["hf_dir"], DEVICE="cpu",
               MAX_NEW_TOKENS="3", MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        ["bash", "examples/qwen2vl/inference_qwen2vl_7b.sh", "--image", w["images"]["wide.png"], "--image",
         w["images"]["tall.png"], "--prompt", "Compare the two pictures.", "--max-new-tokens", str(NEW),
         "--stop-token-ids", "--output-json", str(out)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out) as f:
        result = json.load(f)
    assert result["token_ids"] == w["single"][1]
    assert proc.stdout.strip() == result["response"].strip()  # streamed to the terminal


def _hf_folder_with_stop(w, stop_ids):
    """A copy of the HF folder whose generation_config.json stops at ``stop_ids`` (as HF generate would)."""
    folder = w["root"] / f"hf_stop_{'_'.join(map(str, stop_ids))}"
    if not folder.exists():
        shutil.copytree(w["hf_dir"], folder)
        path = folder / "generation_config.json"
        gen = json.loads(path.read_text()) if path.exists() else {}
        gen["eos_token_id"] = stop_ids
        path.write_text(json.dumps(gen))
    return str(folder)


def test_launcher_2b_shipped_json_takes_stop_ids_from_the_hf_folder(world):
    """inference_qwen2vl_2b.sh with its shipped JSON and a non-Qwen tokenizer, paths overridden as the
    README says: stop ids come from the HF folder's generation_config.json, as in HF generate."""
    import subprocess

    w = world
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = w["root"] / "launcher_2b.json"
    env = dict(os.environ, LOAD_PATH=str(w["root"] / "tp2"), TOKENIZER_PATH=_hf_folder_with_stop(w, [w["stop"]]),
               DEVICE="cpu", MAX_NEW_TOKENS=str(NEW), MASTER_PORT=str(free_port()))
    proc = subprocess.run(
        ["bash", "examples/qwen2vl/inference_qwen2vl_2b.sh", "--image", w["images"]["wide.png"],
         "--prompt", "Describe the picture.", "--output-json", str(out), "--no-stream"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    with open(out) as f:
        assert json.load(f)["token_ids"] == w["stopped"]  # HF generate's answer, stopped at its eos
    # the stop set lacks <|im_end|>: reported on one line
    assert any(line.startswith("warning: ") and "<|im_end|>" in line for line in proc.stderr.splitlines())


def test_chat_image_placeholder_gives_the_records_prompt(world, tmp_path):
    """--image + --prompt '<image>\\nQ' puts the image where it stands: the same ids as the MLLM record
    (the data template's layout) run with --input."""
    from mindspeed_mm.inference.arguments import parse_args
    from mindspeed_mm.inference.main import prepare

    w = world
    question = "<image>\nDescribe the picture."
    records = [{"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "A wide one."}],
                "images": [w["images"]["wide.png"]]}]
    (tmp_path / "one.json").write_text(json.dumps(records))
    base = ["--load", str(w["root"] / "tp2"), "--tokenizer-path", w["hf_dir"]]
    chat = prepare(parse_args(base + ["--image", w["images"]["wide.png"], "--prompt", question]))[3][0]
    batch = prepare(parse_args(base + ["--input", str(tmp_path / "one.json"), "--output", str(tmp_path / "o")]))[3][0]
    assert chat.input_ids == batch.input_ids
    default = prepare(parse_args(base + ["--image", w["images"]["wide.png"], "--prompt", "Describe the picture."]))
    assert default[3][0].input_ids != chat.input_ids  # without <image>: image first, no newline


def test_user_mistakes_name_the_real_flag(world, tmp_path):
    """Through inference_qwen2vl.py: exit 2, one 'error:' line naming the flag or file at fault."""
    import subprocess
    import sys

    w = world
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = json.loads((w["root"] / "tp2" / "model.json").read_text())
    (tmp_path / "wide_model.json").write_text(json.dumps(dict(cfg, text=dict(cfg["text"], ffn_hidden_size=128))))
    base = ["--config", "examples/qwen2vl/inference_qwen2vl_2b.json", "--load", str(w["root"] / "tp2"),
            "--tokenizer-path", w["hf_dir"], "--device", "cpu"]
    cases = [
        (["--prompt", "hi", "--iteration", "7"], "error: --iteration 7: iter_0000007/ not found in --load "),
        (["--prompt", "hi", "--image", str(tmp_path)], f"error: --image {tmp_path}: is a directory"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "error: --max-new-tokens 0: must be at least 1"),
        (["--prompt", "<image>\n<image>hi", "--image", w["images"]["wide.png"]],
         "error: --prompt has 2 '<image>' but 1 --image given"),
        (["--prompt", "hi", "--mm-model", str(tmp_path / "wide_model.json")], "error: "),
    ]
    for extra, message in cases:
        proc = subprocess.run([sys.executable, "inference_qwen2vl.py", *base, *extra], capture_output=True,
                              text=True, cwd=root, timeout=120)
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error")]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == lines[0]
    # another size: the checkpoint's shape and what the model JSON asks, not a size-mismatch traceback
    assert "mp_rank_00/model_optim_rng.pt: language_model.decoder.layers.0.mlp.linear_fc1.weight has shape " \
           "[96, 64] but " in lines[0] and "wide_model.json at TP 2 asks [128, 64]" in lines[0], lines[0]
