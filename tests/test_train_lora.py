"""LoRA through pretrain_qwen2vl.py on gloo processes (the model-level comparison with PEFT is
tests/test_lora_model.py):

* iteration 1's loss is the base model's (B = 0 at init), and the loss falls;
* only adapters are saved and only they have optimizer state; the checkpoint names its base;
* TP=2 with the distributed optimizer: 2 iterations + resume for 2 more equal one 4-iteration run;
* PP=2 with an empty-LLM first stage (nothing to train there) gives TP=2's losses, saved and resumed;
* bad input stops before torchrun with one line: rank 0, an unknown target, a LoRA save loaded without
  LoRA flags or with other ones, a LoRA save whose base is gone.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.train_fixtures import (ROOT, convert, env, hf_loss_on_first_samples, losses, make_data, make_hf_model,
                                  run_training, train_flags)

pytestmark = pytest.mark.slow  # torchrun runs
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    hf = make_hf_model(str(root / "hf"))
    return {"root": root, "hf": hf, "mm": convert(hf, str(root / "mm_tp2"), 2, [2]),
            "data": make_data(str(root / "data"), hf)}


def _flags(tiny, iters, *extra):
    return train_flags(tiny["data"], os.path.join(tiny["mm"], "model.json"), iters=iters, tp=2,
                       extra=[*LORA, "--use-distributed-optimizer", *extra])


def _close(a, b, rel=1e-5):
    return abs(a - b) <= rel * abs(b)


@pytest.fixture(scope="module")
def whole(tiny):
    """One 4-iteration LoRA run at TP=2, saved at iteration 4."""
    save = str(tiny["root"] / "whole")
    _, out = run_training(_flags(tiny, 4, "--load", tiny["mm"], "--save", save), nprocs=2)
    return save, out


def test_first_loss_is_the_base_models_and_it_falls(tiny, whole):
    _, out = whole
    curve = losses(out)
    assert sorted(curve) == [1, 2, 3, 4]
    assert _close(curve[1], hf_loss_on_first_samples(tiny["hf"], tiny["data"])), curve
    assert curve[4] < curve[1], curve
    assert "LoRA rank 4, alpha 8 (scale 2)" in out and "every base weight frozen" in out


def test_checkpoint_holds_adapters_and_their_optimizer_state_only(tiny, whole):
    save, _ = whole
    record = json.load(open(os.path.join(save, "lora.json")))
    assert record["base"] == os.path.abspath(tiny["mm"]) and record["base_iteration"] == "release"
    assert record["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                              "targets": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]}
    rank_file = os.path.join(save, "iter_0000004", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(rank_file, map_location="cpu", weights_only=False)
    assert state["model"] and all(".lora.lora_" in k for k in state["model"]), list(state["model"])[:5]
    assert len(state["model"]) == 2 * (6 + 2 + 4 + 2)  # per layer: qkv 3 A/B pairs, proj 1, fc1 2, fc2 1
    shard = torch.load(os.path.join(os.path.dirname(rank_file), "distrib_optim.pt"), map_location="cpu",
                       weights_only=False)
    numel = sum(t.numel() for t in state["model"].values())
    # the distributed optimizer's state covers this rank's adapters (over DP = 1) and nothing else
    flat = [v for v in _tensors(shard) if v.dim() == 1]
    assert flat and max(t.numel() for t in flat) <= numel, (numel, [t.numel() for t in flat][:6])
    assert os.path.getsize(rank_file) < 1e6


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_resume_continues_exactly(tiny, whole):
    _, out = whole
    reference = losses(out)
    save = str(tiny["root"] / "resumed")
    run_training(_flags(tiny, 2, "--load", tiny["mm"], "--save", save), nprocs=2)
    _, second = run_training(_flags(tiny, 4, "--load", save, "--save", save), nprocs=2)
    resumed = losses(second)
    assert sorted(resumed) == [3, 4], resumed
    for it in (3, 4):
        assert _close(resumed[it], reference[it]), (it, resumed[it], reference[it])


def test_pp2_empty_llm_first_stage_matches_tp2_and_resumes(tiny, whole):
    """Stage 0 holds the ViT and the embedding only: no adapter, no gradient buffer, no optimizer state
    (saved as None); 2 iterations + a resume for 2 more give TP=2's 4-iteration losses."""
    _, out = whole
    mm_pp = convert(tiny["hf"], str(tiny["root"] / "mm_pp2"), 1, [0, 2])
    save = str(tiny["root"] / "pp2_save")

    def flags(iters, load):
        return train_flags(tiny["data"], os.path.join(mm_pp, "model.json"), iters=iters, pp=2, extra=[
            *LORA, "--use-distributed-optimizer", "--load", load, "--save", save, "--pipeline-num-layers", "0,2"])

    _, pp2 = run_training(flags(2, mm_pp), nprocs=2)  # saves stage 0 with an empty optimizer
    _, resumed = run_training(flags(4, save), nprocs=2)
    reference, got = losses(out), {**losses(pp2), **losses(resumed)}
    assert sorted(got) == [1, 2, 3, 4] and "at iteration 2" in resumed
    for it in (1, 2, 3, 4):
        assert _close(got[it], reference[it]), (it, got[it], reference[it])


def _preflight(flags):
    """The launcher's check before torchrun: pretrain_qwen2vl.py --preflight."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_qwen2vl.py"), "--preflight", *flags],
                          env=dict(env(), WORLD_SIZE="2"), cwd=ROOT, capture_output=True, text=True, timeout=120)


def _one_error(proc, *needles):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_bad_lora_input_is_one_line(tiny, whole):
    save, _ = whole
    base = ["--load", tiny["mm"]]
    _one_error(_preflight(_flags(tiny, 8, *base, "--lora-rank", "0")), "--lora-rank")
    _one_error(_preflight(_flags(tiny, 8, *base, "--lora-target-modules", "linear_qkv,q_proj")),
               "--lora-target-modules", "q_proj")
    _one_error(_preflight(train_flags(tiny["data"], os.path.join(tiny["mm"], "model.json"), iters=8, tp=2,
                                      extra=["--load", save])), "LoRA adapters", "--lora-rank")
    _one_error(_preflight(_flags(tiny, 8, "--load", save, "--lora-rank", "8")), "--lora-rank 8 (saved: 4)")
    _one_error(_preflight(train_flags(tiny["data"], os.path.join(tiny["mm"], "model.json"), iters=8, tp=2,
                                      extra=["--lora-rank", "4"])), "--lora-rank needs --load")
    moved = str(tiny["root"] / "moved_save")
    shutil.copytree(save, moved)
    record = json.load(open(os.path.join(moved, "lora.json")))
    record["base"] = str(tiny["root"] / "gone")
    json.dump(record, open(os.path.join(moved, "lora.json"), "w"))
    _one_error(_preflight(_flags(tiny, 8, "--load", moved)), "gone", "base")


def test_lora_launcher_trains_resumes_and_exports(tiny, tmp_path):
    """finetune_qwen2vl_2b_lora.sh with its defaults (rank 8, alpha 16, dropout 0.05, the LLM's linears;
    CPU fp32 here), resumed by re-running it on its SAVE_PATH, then exported both ways: the PEFT folder on
    the HF base and the merged HF folder give the same logits."""
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    from tests.multiproc import free_port

    mm11 = convert(tiny["hf"], str(tmp_path / "mm11"), 1, [2])
    save = str(tmp_path / "save")
    launcher_env = dict(env(), GPUS_PER_NODE="1", MBS="1", GBS="2", PRECISION="fp32", MM_DATA=tiny["data"],
                        MM_MODEL=os.path.join(mm11, "model.json"), LOAD_PATH=mm11, SAVE_PATH=save,
                        LOG_DIR=str(tmp_path / "logs"), MASTER_PORT=str(free_port()), TRAIN_ITERS="3")
    script = os.path.join(ROOT, "examples", "qwen2vl", "finetune_qwen2vl_2b_lora.sh")
    first = subprocess.run(["bash", script, "--device", "cpu", "--exit-interval", "2"], env=launcher_env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert "LoRA rank 8, alpha 16 (scale 2), dropout 0.05" in first.stdout and sorted(losses(first.stdout)) == [1, 2]
    launcher_env.update(LOAD_PATH=save, MASTER_PORT=str(free_port()))
    second = subprocess.run(["bash", script, "--device", "cpu"], env=launcher_env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "at iteration 2" in second.stdout and sorted(losses(second.stdout)) == [3]

    export = os.path.join(ROOT, "examples", "qwen2vl", "qwen2vl_convert_to_hf.py")
    for out, extra in (("adapter", []), ("merged", ["--merge-lora"])):
        proc = subprocess.run([sys.executable, export, "--load-dir", save, "--save-dir", str(tmp_path / out),
                               "--hf-dir", tiny["hf"], "--no-progress", *extra], env=env(), cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    load = lambda path: Qwen2VLForConditionalGeneration.from_pretrained(  # noqa: E731
        path, torch_dtype=torch.float32, attn_implementation="eager").eval()
    peft = PeftModel.from_pretrained(load(tiny["hf"]), str(tmp_path / "adapter")).eval()
    merged, base = load(str(tmp_path / "merged")), load(tiny["hf"])
    ids = torch.tensor([[1, 5, 9, 300, 42, 7, 8, 1000]])
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (peft, merged, base))
    assert float((a - b).abs().max()) < 1e-5
    assert float((a - c).abs().max()) > 1e-4  # three iterations at 1e-4 moved the model
