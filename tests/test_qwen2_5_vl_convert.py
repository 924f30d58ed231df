"""Qwen2.5-VL conversion: HF -> ours -> HF bit-identical at TP=2 with uneven pipeline splits, the export loads
in transformers, the family comes from config.json / model.json both ways, and a model of one family used
with a folder of the other is refused in one line.  Also: the shipped model JSONs, the model.json family
rules, LoRA targets of the gated ViT MLP and the tiny Qwen2.5-VL writer.

Models are tests/hf_reference_2_5.py's (perturbed, 4 ViT blocks, 3 LLM layers, vocab 2100 that megatron
pads); input folders in both HF key layouts and both config.json forms (the hub's flat one, whose
vision_config says in_chans and model_type 'qwen2_5_vl').
"""
import importlib.util
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint.convert import convert_hf_to_mm, convert_mm_to_hf
from mindspeed_mm.errors import UserError
from mindspeed_mm.models import load_model_config, spec_of
from mindspeed_mm.models.mapping import hub_key
from mindspeed_mm.models.qwen2_5_vl import QWEN2_5_VL
from mindspeed_mm.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from mindspeed_mm.models.qwen2vl import QWEN2VL
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from scripts.make_tiny_qwen2vl import make_image_processor, make_tokenizer
from tests.hf_reference_2_5 import hf_config, hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hub_flat_config(nested: dict) -> dict:
    """The hub's config.json layout of Qwen2.5-VL: LLM keys at the top, vision_config nested (in_chans,
    the old model_type 'qwen2_5_vl' inside it)."""
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    text.pop("model_type", None)
    flat.update(text)
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["model_type"] = "qwen2_5_vl"
    vision = {k: v for k, v in nested["vision_config"].items() if k not in ("in_channels", "rope_parameters")}
    flat["vision_config"] = {**vision, "in_chans": nested["vision_config"]["in_channels"], "model_type": "qwen2_5_vl"}
    return flat


def _write_hf_dir(path, tied: bool, internal_sharded: bool):
    """As save_pretrained writes it, or with transformers' internal keys in two shards + index and the
    hub's flat config.json."""
    model = hf_model(hf_config(tie_word_embeddings=tied), seed=1 if tied else 2)
    model.save_pretrained(path)
    make_tokenizer(str(path))
    make_image_processor(str(path))
    if internal_sharded:
        os.remove(path / "model.safetensors")
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in halves.items():
            save_file({k: state[k] for k in keys}, str(path / file), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(hub_flat_config(config)))
    return path, model


def _read_folder(path):
    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), "pt") as f:
                out.update({hub_key(k): f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf25")
    return {(tied, internal): _write_hf_dir(base / f"tied{int(tied)}_internal{int(internal)}", tied, internal)
            for tied, internal in ((False, False), (True, True))}


@pytest.fixture(scope="module")
def qwen2vl_dirs(tmp_path_factory):
    """A tiny Qwen2-VL HF folder and its converted checkpoint (the other family)."""
    from tests.hf_reference import hf_config as qwen2vl_config, hf_model as qwen2vl_model

    base = tmp_path_factory.mktemp("hf2")
    qwen2vl_model(qwen2vl_config(), seed=3).save_pretrained(base / "hf")
    convert_hf_to_mm(str(base / "hf"), str(base / "mm"), progress=False)
    return base / "hf", base / "mm"


CASES = [  # (tied, internal keys + sharded + flat config, pipeline LLM layers per stage); TP 2 throughout
    (False, False, [0, 2, 1]),  # empty-LLM first stage, then an uneven 2 + 1
    (True, True, [1, 2]),  # tied head: the last stage holds megatron's copy of the embedding
]


@pytest.mark.parametrize("tied,internal,stages", CASES)
def test_round_trip_is_bit_identical_and_loads_in_transformers(hf_dirs, tmp_path, tied, internal, stages):
    from transformers import Qwen2_5_VLForConditionalGeneration

    src, original_model = hf_dirs[(tied, internal)]
    mm, out = tmp_path / "mm", tmp_path / "hf"
    convert_hf_to_mm(str(src), str(mm), tensor_parallel_size=2, pipeline_num_layers=stages, progress=False)
    ranks = [f"mp_rank_{t:02d}_{p:03d}" for p in range(len(stages)) for t in range(2)]
    assert sorted(os.listdir(mm / "release")) == sorted(ranks + ["layout.json"])
    saved = json.loads((mm / "model.json").read_text())
    assert next(iter(saved)) == "model_type" and saved["model_type"] == "qwen2_5_vl"
    cfg = load_model_config(str(mm))
    assert isinstance(cfg, Qwen2_5_VLConfig) and spec_of(cfg) is QWEN2_5_VL
    want = Qwen2_5_VLConfig.from_hf(hf_config(tie_word_embeddings=tied).to_dict())
    want.dtype = "fp32"
    assert cfg == want and cfg.vision.fullatt_block_indexes == [1] and cfg.vision.window_size == 56

    convert_mm_to_hf(str(mm), str(out), str(src), max_shard_bytes=100_000, progress=False)
    original, exported = _read_folder(src), _read_folder(out)
    assert exported.keys() == original.keys()
    assert "visual.blocks.3.mlp.gate_proj.bias" in exported and "visual.merger.ln_q.weight" in exported
    for k in original:
        assert exported[k].dtype == original[k].dtype and torch.equal(exported[k], original[k]), k

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out))
    got, ref = model.state_dict(), original_model.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert model.config.vision_config.fullatt_block_indexes == [1]


def test_both_config_forms_give_one_config(hf_dirs):
    nested = json.loads((hf_dirs[(False, False)][0] / "config.json").read_text())
    flat = json.loads((hf_dirs[(True, True)][0] / "config.json").read_text())
    a, b = Qwen2_5_VLConfig.from_hf(nested), Qwen2_5_VLConfig.from_hf(flat)
    b.text.tie_word_embeddings = a.text.tie_word_embeddings
    assert a == b
    assert (a.vision.hidden_size, a.vision.out_hidden_size, a.vision.ffn_hidden_size) == (32, 64, 48)
    assert a.text.mrope_section == [2, 3, 3] and a.text.num_query_groups == 2


def _cli_in_process(script, capsys, *args):
    """(exit code, stderr) of an entry script's main, run in this process."""
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, "examples/qwen2vl", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main([*args, "--no-progress"])
    return exit_info.value.code, capsys.readouterr().err


def test_family_mismatch_is_one_line(hf_dirs, qwen2vl_dirs, tmp_path, capsys):
    src25 = hf_dirs[(False, False)][0]
    hf2, mm2 = qwen2vl_dirs
    mm25 = tmp_path / "mm25"
    convert_hf_to_mm(str(src25), str(mm25), progress=False)
    save = tmp_path / "out"
    cases = [(mm25, hf2, "is a Qwen2.5-VL model but", "is Qwen2-VL (model_type 'qwen2_vl')"),
             (mm2, src25, "is a Qwen2-VL model but", "is Qwen2.5-VL (model_type 'qwen2_5_vl')")]
    for load, hf_dir, first, second in cases:
        code, err = _cli_in_process("qwen2vl_convert_to_hf.py", capsys, "--load-dir", str(load),
                                    "--save-dir", str(save), "--hf-dir", str(hf_dir))
        assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert first in err and second in err and "--hf-dir is not this model's HF folder" in err, err
        assert not save.exists()
    # the same family both ways still exports (the Qwen2-VL model.json names no family)
    convert_mm_to_hf(str(mm2), str(save), str(hf2), progress=False)
    assert load_model_config(str(mm2)).__class__ is Qwen2VLConfig and spec_of(load_model_config(str(mm2))) is QWEN2VL


def test_model_json_names_its_family(hf_dirs, qwen2vl_dirs, tmp_path):
    _, mm2 = qwen2vl_dirs
    src25 = hf_dirs[(False, False)][0]
    assert "model_type" not in json.loads((mm2 / "model.json").read_text())  # Qwen2-VL's stays as it was
    with pytest.raises(UserError, match="not a Qwen2.5-VL model JSON: it has no model_type"):
        Qwen2_5_VLConfig.load(str(mm2))
    cfg = Qwen2_5_VLConfig.from_hf(json.loads((src25 / "config.json").read_text()))
    cfg.save(str(tmp_path / "model.json"))
    with pytest.raises(UserError, match="not a Qwen2-VL config"):
        Qwen2VLConfig.load(str(tmp_path / "model.json"))
    assert load_model_config(str(tmp_path / "model.json")) == cfg
    assert load_model_config(str(src25 / "config.json")) == cfg  # an HF config.json as --mm-model
    data = json.loads((tmp_path / "model.json").read_text())
    data["vision"]["fullatt_block_indexes"] = [4]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"fullatt_block_indexes \[4\]"):
        load_model_config(str(tmp_path / "bad.json"))


OFFICIAL = {  # hidden, layers, heads, kv heads, ffn, vocab, tied (the hub's Qwen2.5-VL-*-Instruct config.json)
    "3b": (2048, 36, 16, 2, 11008, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
    "32b": (5120, 64, 40, 8, 27648, 152064, False),
    "72b": (8192, 80, 64, 8, 29568, 152064, False),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_shipped_model_json(name):
    cfg = load_model_config(f"examples/qwen2_5vl/model_{name}.json")
    assert isinstance(cfg, Qwen2_5_VLConfig)
    t, v = cfg.text, cfg.vision
    assert (t.hidden_size, t.num_layers, t.num_attention_heads, t.num_query_groups, t.ffn_hidden_size,
            t.vocab_size, t.tie_word_embeddings) == OFFICIAL[name]
    assert (v.num_layers, v.hidden_size, v.num_attention_heads, v.ffn_hidden_size, v.out_hidden_size, v.patch_size,
            v.spatial_merge_size, v.temporal_patch_size, v.window_size, v.fullatt_block_indexes,
            v.tokens_per_second, v.layernorm_epsilon, v.activation_func) == \
        (32, 1280, 16, 3420, t.hidden_size, 14, 2, 2, 112, [7, 15, 23, 31], 2, 1e-6, "silu")
    assert t.mrope_section == [16, 24, 24] and t.rope_theta == 1e6 and t.max_position_embeddings == 128000
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id) == \
        (151652, 151653, 151655, 151656)
    assert isinstance(load_model_config("examples/qwen2vl/model_7b.json"), Qwen2VLConfig)  # no model_type


def test_lora_targets_of_the_gated_vit_mlp():
    from mindspeed_mm.models import lora
    from tests.hf_reference_2_5 import our_config

    cfg = our_config()
    specs = {s.module: s for s in lora.adapter_specs(QWEN2_5_VL.mapping, cfg, lora.TARGETS)}
    fc1 = specs["vision_encoder.blocks.layers.2.mlp.linear_fc1"]
    assert fc1.hf_modules == ("visual.blocks.2.mlp.gate_proj", "visual.blocks.2.mlp.up_proj")
    assert fc1.layout == "concat" and fc1.shapes == ((48, 32), (48, 32))
    assert specs["vision_encoder.blocks.layers.2.mlp.linear_fc2"].hf_modules == ("visual.blocks.2.mlp.down_proj",)
    assert specs["vision_projector.linear_fc2"].shapes == ((64, 128),)


def test_tiny_qwen2_5_vl_folder(tmp_path):
    """scripts/make_tiny_qwen2vl.py --family qwen2_5_vl: a folder the converter reads as Qwen2.5-VL, with the
    same tokenizer, chat template and image processor as Qwen2-VL's."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    from scripts.make_tiny_qwen2vl import main

    assert main(["--save-dir", str(tmp_path / "hf"), "--family", "qwen2_5_vl"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    prompt = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                                     tokenize=False, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>" in prompt
    assert Qwen2VLImageProcessor.from_pretrained(str(tmp_path / "hf")).merge_size == 2
    convert_hf_to_mm(str(tmp_path / "hf"), str(tmp_path / "mm"), progress=False)
    cfg = load_model_config(str(tmp_path / "mm"))
    assert spec_of(cfg) is QWEN2_5_VL and cfg.vision.window_merge_units == 2
