"""What a new user hits in training (issue 11), through the guide's launcher as a user runs it.

* training further: a changed schedule is refused in one line naming --override-opt-param-scheduler
  and --use-checkpoint-opt-param-scheduler; with either flag the run does exactly that; --train-iters
  below the saved iteration is refused;
* two runs on one SAVE_PATH: the second stops at start-up; kill -9 of the first launcher's process
  group ends the whole job, and its lock does not block the next run;
* user mistakes found before torchrun starts: one ``error:`` line, exit 2, no traceback, no
  ChildFailedError wall;
* the checkpoint's recorded pipeline split is used when the flags leave it out; a TP / model /
  split mismatch is one line;
* a truncated latest checkpoint names the file and --ckpt-step, which loads the previous one;
* a full disk during a save is one line, nothing half-written; fp16 saves before its first
  applied step.
"""
import json
import os
import re
import resource
import signal
import subprocess
import time

import pytest

from tests.multiproc import free_port
from tests.train_fixtures import ROOT, convert, env, losses, make_data, make_hf_model

pytestmark = pytest.mark.slow  # torchrun / launcher runs: left out by -m "not slow"

LAUNCHER = os.path.join(ROOT, "examples", "qwen2vl", "finetune_qwen2vl_2b.sh")
LR_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| learning rate: ([-+0-9.E]+) \|")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_errors")
    hf = make_hf_model(str(root / "hf"))
    return {"root": root, "hf": hf,
            "mm11": convert(hf, str(root / "mm_tp1"), 1, [2]),
            "mm_tp2": convert(hf, str(root / "mm_tp2"), 2, [2]),
            "mm_pp02": convert(hf, str(root / "mm_pp02"), 1, [0, 2]),
            "data": make_data(str(root / "data"), hf, num_images=4)}


def launcher_env(tiny, save, **extra):
    e = dict(env(), GPUS_PER_NODE="1", TP="1", PP="1", MBS="1", GBS="2", PRECISION="fp32",
             MM_DATA=tiny["data"], MM_MODEL=os.path.join(tiny["mm11"], "model.json"), LOAD_PATH=tiny["mm11"],
             SAVE_PATH=str(save), LOG_DIR=str(tiny["root"] / "logs"), MASTER_PORT=str(free_port()),
             TRAIN_ITERS="2", LR="1e-3", MIN_LR="1e-4")
    e.update({k: str(v) for k, v in extra.items()})
    return e


def launch(tiny, save, *flags, timeout=300, preexec_fn=None, **extra):
    proc = subprocess.run(["bash", LAUNCHER, "--device", "cpu", *flags], env=launcher_env(tiny, save, **extra),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)
    return proc.returncode, proc.stdout + proc.stderr


def assert_one_error(rc, out, *needles):
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert rc == 2, out[-3000:]
    assert len(errors) == 1, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def learning_rates(out):
    return {int(m.group(1)): float(m.group(2)) for m in LR_LINE.finditer(out)}


@pytest.fixture(scope="module")
def saved_run(tiny):
    """Two iterations through the launcher, a checkpoint after each."""
    save = tiny["root"] / "run1"
    rc, out = launch(tiny, save, "--save-interval", "1")
    assert rc == 0, out[-3000:]
    assert sorted(losses(out)) == [1, 2]
    assert "TFLOP/s/CPU" in out and "TFLOP/s/GPU" not in out  # the device the processes really ran on
    return save


def test_training_further_needs_a_schedule_choice(tiny, saved_run):
    rc, out = launch(tiny, tiny["root"] / "run1_further", LOAD_PATH=saved_run, TRAIN_ITERS=4)
    assert_one_error(rc, out, "--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler",
                     "--lr-decay-iters/--train-iters gives 4, saved 2")

    rc, out = launch(tiny, saved_run, LOAD_PATH=saved_run, TRAIN_ITERS=1)
    assert_one_error(rc, out, "--train-iters 1", "already at iteration 2", "nothing to train")


def test_override_follows_the_new_schedule(tiny, saved_run):
    save = tiny["root"] / "run1_override"
    rc, out = launch(tiny, save, "--override-opt-param-scheduler", LOAD_PATH=saved_run, TRAIN_ITERS=4)
    assert rc == 0, out[-3000:]
    assert "learning-rate schedule (these flags)" in out
    rates = learning_rates(out)
    assert sorted(rates) == [3, 4]
    # The old schedule had decayed to min-lr at iteration 2; the new one decays over 4 iterations.
    assert rates[3] > 1e-4 * 1.5 and rates[4] < rates[3], rates


def test_use_checkpoint_keeps_the_saved_schedule(tiny, saved_run):
    save = tiny["root"] / "run1_keep"
    rc, out = launch(tiny, save, "--use-checkpoint-opt-param-scheduler", LOAD_PATH=saved_run, TRAIN_ITERS=3)
    assert rc == 0, out[-3000:]
    assert "learning-rate schedule (the checkpoint)" in out
    assert learning_rates(out)[3] == pytest.approx(1e-4)  # past the saved decay: min-lr


def test_truncated_latest_checkpoint_names_file_and_ckpt_step(tiny, saved_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved_run, copy)
    target = copy / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 2)
    rc, out = launch(tiny, tmp_path / "out", LOAD_PATH=copy, TRAIN_ITERS=3)
    assert_one_error(rc, out, str(target), "--ckpt-step 1")
    rc, out = launch(tiny, tmp_path / "out", "--ckpt-step", "1", LOAD_PATH=copy, TRAIN_ITERS=2)
    assert rc == 0, out[-3000:]
    assert "at iteration 1" in out and sorted(losses(out)) == [2]


def test_one_line_before_torchrun(tiny, tmp_path):
    data = json.load(open(tiny["data"]))
    bad = dict(data, dataset_param=dict(data["dataset_param"], bogus_key=1))
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps(bad))
    missing = dict(data, dataset_param=dict(data["dataset_param"],
                                            basic_parameters=dict(data["dataset_param"]["basic_parameters"],
                                                                  dataset=str(tmp_path / "nope.json"))))
    missing_file = tmp_path / "missing.json"
    missing_file.write_text(json.dumps(missing))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        ({"MM_DATA": typo}, [], "bogus_key"),
        ({"MM_DATA": missing_file}, [], "nope.json"),
        ({"GBS": 3, "GPUS_PER_NODE": 2}, [], "--global-batch-size 3"),
        ({}, ["--train-iters", "0"], "--train-iters"),
        ({"LOAD_PATH": tmp_path / "no_ckpt"}, [], "no_ckpt"),
        ({"SAVE_PATH": blocker / "sub"}, [], "not writable"),
        ({"GPUS_PER_NODE": 2, "PP": 2}, ["--pipeline-num-layers", "1,1"], "was written at TP 1, PP 1"),
        ({"LOAD_PATH": tiny["mm_tp2"]}, [], "TP 2"),
    ]
    for extra, flags, needle in cases:
        start = time.time()
        rc, out = launch(tiny, tmp_path / "save", *flags, **extra)
        assert_one_error(rc, out, needle)
        assert "training Qwen2-VL on" not in out, out[-2000:]  # found before any process started
        assert time.time() - start < 60


def test_model_mismatch_is_one_line(tiny, tmp_path):
    cfg = json.load(open(os.path.join(tiny["mm11"], "model.json")))
    cfg["text"]["ffn_hidden_size"] *= 2
    other = tmp_path / "model.json"
    other.write_text(json.dumps(cfg))
    rc, out = launch(tiny, tmp_path / "save", MM_MODEL=other)
    assert_one_error(rc, out, "text.ffn_hidden_size 192 (checkpoint: 96)")


def test_pipeline_split_read_from_the_checkpoint(tiny, tmp_path):
    # Converted with [0, 2]; the launcher is given PP=2 and no split.
    rc, out = launch(tiny, tmp_path / "save", GPUS_PER_NODE=2, PP=2, TRAIN_ITERS=1, LOAD_PATH=tiny["mm_pp02"],
                     MM_MODEL=os.path.join(tiny["mm_pp02"], "model.json"))
    assert rc == 0, out[-3000:]
    assert "LLM layers per stage [0, 2]" in out
    rc, out = launch(tiny, tmp_path / "save2", "--pipeline-num-layers", "1,1", GPUS_PER_NODE=2, PP=2,
                     LOAD_PATH=tiny["mm_pp02"], MM_MODEL=os.path.join(tiny["mm_pp02"], "model.json"))
    assert_one_error(rc, out, "LLM layers [0, 2]", "LLM layers [1, 1]")


def _job_pids(marker):
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_second_run_on_same_save_path_and_kill9(tiny, tmp_path):
    save = tmp_path / "shared_save"
    first = subprocess.Popen(["bash", LAUNCHER, "--device", "cpu", "--train-iters", "100000"],
                             env=launcher_env(tiny, save, LOG_INTERVAL=1), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = ""
        deadline = time.time() + 240
        while "iteration        1/" not in seen and time.time() < deadline:
            line = first.stdout.readline()
            if not line:
                break
            seen += line
        assert "iteration        1/" in seen, seen[-3000:]
        rc, out = launch(tiny, save)
        assert_one_error(rc, out, str(save), "in use by another training run")
        assert _job_pids(str(save)), "the first job is not running"
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the launcher's process group, as a user's kill -9
        first.wait()
    deadline = time.time() + 30
    while _job_pids(str(save)) and time.time() < deadline:
        time.sleep(0.5)
    assert not _job_pids(str(save)), "torchrun / the trainer outlived the killed launcher"
    rc, out = launch(tiny, save, TRAIN_ITERS=1)  # the killed holder's lock is gone
    assert rc == 0, out[-3000:]


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_during_save_is_one_line(tiny, saved_run, tmp_path):
    save = tmp_path / "full"
    size = os.path.getsize(os.path.join(saved_run, "iter_0000001", "mp_rank_00", "model_optim_rng.pt"))
    # No torch.compile here: its C++ probe writes large temporary files.
    rc, out = launch(tiny, save, TRAIN_ITERS=1, preexec_fn=_limit_file_size(size // 2), TORCH_COMPILE_DISABLE=1)
    assert_one_error(rc, out, "checkpoint of iteration 1 not saved", "no earlier checkpoint")
    assert not [n for n in os.listdir(save) if n.startswith("iter_")], os.listdir(save)


def test_fp16_saves_before_its_first_applied_step(tiny, tmp_path):
    save = tmp_path / "fp16"
    rc, out = launch(tiny, save, PRECISION="fp16", TRAIN_ITERS=1)
    assert rc == 0, out[-3000:]
    assert open(save / "latest_checkpointed_iteration.txt").read().strip() == "1"
    rc, out = launch(tiny, tmp_path / "fp16b", "--override-opt-param-scheduler", PRECISION="fp16", TRAIN_ITERS=2,
                     LOAD_PATH=save)
    assert rc == 0, out[-3000:]


def test_help_works():
    proc = subprocess.run(["python", os.path.join(ROOT, "pretrain_qwen2vl.py"), "--help"], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--override-opt-param-scheduler" in proc.stdout and "--ckpt-step" in proc.stdout


def test_save_dir_without_room_for_one_checkpoint(tmp_path):
    import shutil

    from mindspeed_mm.errors import UserError
    from mindspeed_mm.models.qwen2vl.config import Qwen2VLConfig
    from mindspeed_mm.training.arguments import parse_args
    from mindspeed_mm.training.preflight import check_save_dir, checkpoint_bytes

    cfg = Qwen2VLConfig.load(os.path.join(ROOT, "examples", "qwen2vl", "model_72b.json"))
    args = parse_args(["--mm-data", "d.json", "--mm-model", "m.json", "--save", str(tmp_path / "save"), "--bf16"])
    need = checkpoint_bytes(cfg, args)
    assert 0.9e12 < need < 1.2e12  # 72B parameters x (2 bytes bf16 + 12 bytes fp32 main params and moments)
    if shutil.disk_usage(tmp_path).free >= need:
        pytest.skip("this disk has room for a 72B checkpoint")
    with pytest.raises(UserError, match="GB free, but one checkpoint of this model takes about"):
        check_save_dir(args, cfg)
