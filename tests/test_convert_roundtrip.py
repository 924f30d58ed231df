"""HF -> ours -> HF is bit-identical, through the CLIs' library functions, for every layout we support.

Tiny models from tests/hf_reference.py (3 LLM layers, vocab 2100 that megatron pads, 4 heads over
2 KV groups), tied (2B-like) and untied (7B-like); input folders in both HF key layouts and both
config.json forms.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoint import convert
from checkpoint.convert import convert_hf_to_mm, convert_mm_to_hf
from checkpoint.hf_io import HFCheckpoint
from mindspeed_mm.errors import UserError
from mindspeed_mm.models.mapping import hub_key
from mindspeed_mm.models.qwen2vl import QWEN2VL
from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
from scripts.make_tiny_qwen2vl import make_image_processor, make_tokenizer
from tests.hf_reference import hf_config, hf_model, hub_flat_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_hf_dir(path, tied: bool, internal_sharded: bool):
    """An HF folder: as save_pretrained writes it (hub keys, one file, nested text_config), or
    with transformers' internal keys in two shards + index and the hub's flat config.json."""
    model = hf_model(hf_config(tie_word_embeddings=tied), seed=1 if tied else 2)
    model.save_pretrained(path)
    make_tokenizer(str(path))
    make_image_processor(str(path))
    if internal_sharded:
        os.remove(path / "model.safetensors")
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (tied and k == "lm_head.weight")}
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        for file, keys in halves.items():
            save_file({k: state[k] for k in keys}, str(path / file), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(hub_flat_config(config)))
    return path


def _read_folder(path):
    """hub name -> tensor for every safetensors file in ``path``."""
    out = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            with safe_open(os.path.join(path, file), "pt") as f:
                out.update({hub_key(k): f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    dirs = {}
    for tied in (False, True):
        for internal in (False, True):
            dirs[(tied, internal)] = _write_hf_dir(base / f"tied{int(tied)}_internal{int(internal)}", tied, internal)
    return dirs


CASES = [  # (tied, internal keys + sharded + flat config, TP, pipeline layer index)
    (False, False, 1, None),
    (False, True, 2, [0, 0, 2]),  # empty-LLM first stage, uneven 2 + 1 after it
    (True, False, 1, None),
    (True, True, 2, [0, 0, 2]),
    (True, False, 2, [0, 1]),
]


@pytest.mark.parametrize("tied,internal,tp,layer_index", CASES)
def test_round_trip_is_bit_identical(hf_dirs, tmp_path, tied, internal, tp, layer_index):
    src = hf_dirs[(tied, internal)]
    mm, out = tmp_path / "mm", tmp_path / "hf"
    summary = convert_hf_to_mm(str(src), str(mm), tensor_parallel_size=tp, pipeline_layer_index=layer_index,
                               progress=False)
    pp = len(layer_index or [0])
    ranks = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else "") for p in range(pp) for t in range(tp)]
    assert (mm / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert sorted(os.listdir(mm / "release")) == sorted(ranks + ["layout.json"])
    assert json.loads((mm / "release" / "layout.json").read_text()) == {
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "pipeline_num_layers": [b - a for a, b in zip(layer_index, layer_index[1:] + [3])] if layer_index else [3]}
    assert sorted(os.listdir(mm)) == ["latest_checkpointed_iteration.txt", "model.json", "release"]
    saved = torch.load(mm / "release" / ranks[-1] / "model_optim_rng.pt", weights_only=False)
    assert set(saved) >= {"model", "checkpoint_version", "iteration"}
    cfg = Qwen2VLConfig.load(str(mm))
    want = Qwen2VLConfig.from_hf(hf_config(tie_word_embeddings=tied).to_dict())
    want.dtype = "fp32"  # the tensors' own dtype
    assert cfg.to_dict() == want.to_dict()
    assert summary.files[:len(ranks)] == [f"release/{r}/model_optim_rng.pt" for r in sorted(ranks, key=_pp_tp)]

    convert_mm_to_hf(str(mm), str(out), str(src), progress=False)
    original, exported = _read_folder(src), _read_folder(out)
    assert exported.keys() == original.keys()
    for k in original:
        assert exported[k].dtype == original[k].dtype and torch.equal(exported[k], original[k]), k
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f or ".old-" in f]


@pytest.mark.parametrize("tied,internal", [(True, True), (False, True)])
def test_byte_copies_equal_the_mapping_in_memory(hf_dirs, tmp_path, tied, internal):
    """The kernel-copy path (checkpoint/copy_plan.py) writes exactly what hf_to_mm + shard_state compute."""
    src = hf_dirs[(tied, internal)]
    stage_layers, tp = [0, 2, 1], 2
    convert_hf_to_mm(str(src), str(tmp_path / "mm"), tensor_parallel_size=tp, pipeline_num_layers=stage_layers,
                     progress=False)
    hf = HFCheckpoint(str(src))
    full = QWEN2VL.hf_to_mm(hf, hf.cfg)
    for p in range(len(stage_layers)):
        for t in range(tp):
            want = QWEN2VL.shard_state(full, hf.cfg, tp, t, stage_layers, p)
            path = tmp_path / "mm" / "release" / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt"
            for kwargs in (dict(mmap=True), dict(weights_only=True)):
                got = torch.load(path, **kwargs)["model"]
                assert list(got) == list(want)
                for k in want:
                    assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (p, t, k)


def _pp_tp(rank_dir):
    parts = rank_dir.split("_")[2:]
    return (int(parts[1]) if len(parts) > 1 else 0, int(parts[0]))


def test_export_loads_with_transformers(hf_dirs, tmp_path):
    from transformers import (
        AutoTokenizer,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    src = hf_dirs[(True, True)]
    mm, out = tmp_path / "mm", tmp_path / "hf"
    convert_hf_to_mm(str(src), str(mm), tensor_parallel_size=2, pipeline_num_layers=[1, 2], progress=False)
    # As training saves it: iter_N, tracker names N; a small shard size forces several shards.
    os.rename(mm / "release", mm / "iter_0000007")
    (mm / "latest_checkpointed_iteration.txt").write_text("7\n")
    convert_mm_to_hf(str(mm), str(out), str(src), max_shard_bytes=200_000, progress=False)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(out))
    reference = hf_model(hf_config(tie_word_embeddings=True), seed=1)
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.convert_tokens_to_ids("<|image_pad|>") == model.config.image_token_id
    Qwen2VLImageProcessor.from_pretrained(str(out))
    with pytest.raises(UserError, match="iter_0000003/ not found"):
        convert_mm_to_hf(str(mm), str(tmp_path / "other"), str(src), iteration=3, progress=False)


def test_params_dtype_casts_and_is_recorded(hf_dirs, tmp_path):
    src = hf_dirs[(False, False)]
    mm = tmp_path / "mm"
    convert_hf_to_mm(str(src), str(mm), params_dtype="bf16", progress=False)
    state = torch.load(mm / "release/mp_rank_00/model_optim_rng.pt", weights_only=False)["model"]
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    assert Qwen2VLConfig.load(str(mm)).dtype == "bf16"
    out = tmp_path / "hf"
    convert_mm_to_hf(str(mm), str(out), str(src), params_dtype="fp32", progress=False)
    original, exported = _read_folder(src), _read_folder(out)
    for k in original:  # fp32 -> bf16 -> fp32 is bf16 rounding, exactly
        assert torch.equal(exported[k], original[k].to(torch.bfloat16).float()), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def _cli(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples/qwen2vl", script), *args,
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT)


def _cli_in_process(script, capsys, *args):
    """(exit code, stderr) of an entry script's main, run in this process (fast)."""
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, "examples/qwen2vl", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_info:
        module.main([*args, "--no-progress"])
    return exit_info.value.code, capsys.readouterr().err


def test_cli_and_launcher(hf_dirs, tmp_path):
    src = hf_dirs[(False, False)]
    env = dict(os.environ, LOAD_DIR=str(src), SAVE_DIR=str(tmp_path / "mm"), TP="2",
               PIPELINE_LAYER_INDEX="0 2", PARAMS_DTYPE="fp32")
    run = subprocess.run(["bash", os.path.join(ROOT, "examples/qwen2vl/modelconvert.sh"), "--no-progress"],
                         env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "converted" in run.stdout and "7 files" in run.stdout  # 4 rank files, layout.json, tracker, model.json
    assert sorted(os.listdir(tmp_path / "mm" / "release")) == \
        ["layout.json", "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    run = _cli("qwen2vl_convert_to_hf.py", "--load-dir", str(tmp_path / "mm"), "--save-dir",
               str(tmp_path / "hf"), "--hf-dir", str(src))
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]


def _bad_hf_dirs(hf_dirs, tmp_path):
    src = hf_dirs[(False, False)]
    not_qwen = tmp_path / "llama"
    not_qwen.mkdir()
    (not_qwen / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    extra = tmp_path / "extra"
    extra.mkdir()
    for f in os.listdir(src):
        os.symlink(src / f, extra / f)
    os.remove(extra / "model.safetensors")
    state = _read_folder(src)
    save_file({**state, "visual.blocks.0.attn.extra": torch.zeros(2)}, str(extra / "model.safetensors"))
    return src, not_qwen, extra


def test_bad_input_is_one_line_before_writing(hf_dirs, tmp_path, capsys):
    src, not_qwen, extra = _bad_hf_dirs(hf_dirs, tmp_path)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    save = str(tmp_path / "out")
    cases = [
        (["--load-dir", str(tmp_path / "missing"), "--save-dir", save], "HF checkpoint directory not found"),
        (["--load-dir", str(not_qwen), "--save-dir", save], "not a Qwen2-VL config"),
        (["--load-dir", str(src), "--save-dir", save, "--tensor-parallel-size", "3"], "does not divide"),
        (["--load-dir", str(src), "--save-dir", save, "--pipeline-layer-index", "0", "5"], "at most num_layers"),
        (["--load-dir", str(src), "--save-dir", save, "--pipeline-num-layers", "1", "1"], "summing to"),
        (["--load-dir", str(src), "--save-dir", save, "--num-layers", "28"], "has 3 LLM layers"),
        (["--load-dir", str(src), "--save-dir", str(full), "--pipeline-layer-index", "0"], "not empty"),
        (["--load-dir", str(extra), "--save-dir", save, "--pipeline-layer-index", "0"],
         "not used by Qwen2-VL, e.g. visual.blocks.0.attn.extra"),
    ]
    for args, message in cases:
        code, err = _cli_in_process("qwen2vl_convert_to_mm_ckpt.py", capsys, *args)
        assert code == 2 and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
        assert not os.path.exists(save) and os.listdir(full) == ["keep.txt"]
    run = _cli("qwen2vl_convert_to_hf.py", "--load-dir", str(src), "--save-dir", save, "--hf-dir", str(src))
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert "not a Megatron checkpoint" in run.stderr
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_overwrite_and_interrupted_conversion(hf_dirs, tmp_path, monkeypatch):
    src = hf_dirs[(False, False)]
    save = tmp_path / "mm"
    save.mkdir()
    (save / "stale.txt").write_text("old")
    convert_hf_to_mm(str(src), str(save), overwrite=True, progress=False)
    assert "stale.txt" not in os.listdir(save) and (save / "model.json").exists()

    written = []

    real_save = convert.save_rank_streamed

    def failing_save(path, specs, iteration=0):  # the disk fills up after the first rank file
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        return real_save(path, specs, iteration)

    monkeypatch.setattr(convert, "save_rank_streamed", failing_save)
    with pytest.raises(UserError, match="model_optim_rng.pt: no space left on device"):
        convert_hf_to_mm(str(src), str(tmp_path / "new"), tensor_parallel_size=2, progress=False)
    assert written and not os.path.exists(written[0])
    assert sorted(os.listdir(tmp_path)) == ["mm"]  # no partial folder, no temporary left behind
