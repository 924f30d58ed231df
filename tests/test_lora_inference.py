"""A LoRA save through inference and export, against PEFT and transformers.

The save is written in the layout a LoRA training run writes (adapters only, TP=2, lora.json naming a
converted base; tests/test_train_lora.py checks training writes exactly that), with random non-zero
adapters on every target kind.  Then:

* ``qwen2vl_convert_to_hf.py`` exports it as a PEFT folder: ``PeftModel.from_pretrained`` on the HF base
  generates greedy ids that our inference (base + adapters, at TP=1 and TP=2) generates too;
* ``--merge-lora`` exports a full HF folder: plain transformers generates the same ids;
* mistakes are one line: --merge-lora on a full checkpoint, adapters on a base of other shapes.
"""
import json
import os
import shutil

import pytest
import torch

from tests.multiproc import run_ranks
from tests.test_inference_generate import NEW, _hf_generate, _run_mains, hf_world

RANK, ALPHA = 4, 8.0
ITERATION = 5


def _write_lora_save(root: str, base: str, cfg, tp: int = 2):
    """Random adapters in a LoRA save's layout: iter_N/mp_rank_XX files holding this rank's adapters."""
    from checkpoint.layout import iteration_dir, write_layout
    from checkpoint.lora_io import LoRARecord, write_lora_record
    from checkpoint.megatron_io import rank_file, save_rank, write_tracker
    from mindspeed_mm.models import lora
    from mindspeed_mm.models.qwen2vl import QWEN2VL

    settings = lora.LoRASettings(RANK, ALPHA, targets=lora.TARGETS)
    specs = lora.adapter_specs(QWEN2VL.mapping, cfg, settings.targets)
    full = lora.init_full(specs, RANK, seed=3)
    gen = torch.Generator().manual_seed(11)
    for name in full:
        if ".lora_B." in name:
            full[name] = 0.3 * torch.randn(full[name].shape, generator=gen)
    for t in range(tp):
        state = {}
        for local, spec in lora.stage_specs(specs, [cfg.text.num_layers], 0).items():
            pieces = lora.shard(spec, full, tp, t)
            keys = [lora.state_key(local, m, k) for k in range(len(spec.shapes)) for m in ("A", "B")]
            state.update(zip(keys, pieces))
        save_rank(rank_file(root, ITERATION, t, 0, 1), state, iteration=ITERATION)
    write_layout(iteration_dir(root, ITERATION), tp, [cfg.text.num_layers])
    shutil.copy(os.path.join(base, "model.json"), os.path.join(root, "model.json"))
    write_lora_record(root, LoRARecord(settings, os.path.abspath(base), "release"))
    write_tracker(root, ITERATION)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import Qwen2VLForConditionalGeneration

    from checkpoint.convert import convert_hf_to_mm
    from examples.qwen2vl.qwen2vl_convert_to_hf import main as export
    from peft import PeftModel
    from tests.hf_reference import our_config

    root = tmp_path_factory.mktemp("lora_inference")
    hf_dir, model, _, parts = hf_world(root)
    parts = [{k: v for k, v in p.items() if v is not None} for p in parts]
    convert_hf_to_mm(hf_dir, str(root / "base"), tensor_parallel_size=2, progress=False)
    _write_lora_save(str(root / "lora"), str(root / "base"), our_config(model.config))

    assert export(["--load-dir", str(root / "lora"), "--save-dir", str(root / "adapter"), "--hf-dir", hf_dir,
                   "--no-progress"]) == 0
    assert export(["--load-dir", str(root / "lora"), "--save-dir", str(root / "merged"), "--hf-dir", hf_dir,
                   "--merge-lora", "--no-progress"]) == 0
    load = lambda path: Qwen2VLForConditionalGeneration.from_pretrained(  # noqa: E731
        path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    peft = PeftModel.from_pretrained(load(hf_dir), str(root / "adapter")).eval()
    merged = load(str(root / "merged"))
    return dict(root=root, hf_dir=hf_dir, via_peft=[_hf_generate(peft, p)[0] for p in parts],
                via_merged=[_hf_generate(merged, p)[0] for p in parts],
                base=[_hf_generate(model, p)[0] for p in parts])


def _argv(w, tp, out):
    return ["--load", str(w["root"] / "lora"), "--tokenizer-path", w["hf_dir"], "--device", "cpu",
            "--max-new-tokens", str(NEW), "--stop-token-ids", "--no-stream", "--tensor-model-parallel-size", str(tp),
            "--input", str(w["root"] / "eval.json"), "--output", str(w["root"] / out), "--batch-size", "1"]


def _ids(w, name):
    with open(w["root"] / name) as f:
        return [json.loads(line)["token_ids"] for line in f]


def test_exports_load_in_peft_and_transformers(world):
    w = world
    assert sorted(os.listdir(w["root"] / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.load(open(w["root"] / "adapter" / "adapter_config.json"))
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and config["base_model_name_or_path"] == w["hf_dir"]
    assert w["via_peft"] == w["via_merged"]
    assert w["via_peft"] != w["base"]  # the adapters change the answers


def test_our_greedy_ids_equal_peft_generate_tp1_and_tp2(world):
    w = world
    run_ranks(_run_mains, 1, timeout=400, argvs=[_argv(w, 1, "tp1.jsonl")])
    run_ranks(_run_mains, 2, timeout=400, argvs=[_argv(w, 2, "tp2.jsonl")])
    assert _ids(w, "tp1.jsonl") == w["via_peft"]
    assert _ids(w, "tp2.jsonl") == w["via_peft"]


def test_export_mistakes_are_one_line(world, tmp_path, capsys):
    from examples.qwen2vl.qwen2vl_convert_to_hf import main as export
    from tests.hf_reference import hf_config, hf_model

    w = world

    def exit_code(argv):
        with pytest.raises(SystemExit) as stop:
            export(argv)
        return stop.value.code

    assert exit_code(["--load-dir", str(w["root"] / "base"), "--save-dir", str(tmp_path / "x"),
                      "--hf-dir", w["hf_dir"], "--merge-lora"]) == 2
    assert "not a LoRA save" in capsys.readouterr().err
    other = str(tmp_path / "other_hf")  # another model: a wider LLM MLP
    hf_model(hf_config(intermediate_size=128)).save_pretrained(other)
    shutil.copy(os.path.join(w["hf_dir"], "tokenizer.json"), other)
    assert exit_code(["--load-dir", str(w["root"] / "lora"), "--save-dir", str(tmp_path / "y"), "--hf-dir", other]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "trained on another model" in err, err
    assert not os.path.exists(tmp_path / "y")
