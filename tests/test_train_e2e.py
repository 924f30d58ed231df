"""Fine-tuning end to end on gloo processes: a tiny random HF Qwen2-VL converted with the
project's converter, trained by pretrain_qwen2vl.py on the real data pipeline.

* iteration 1's loss equals the HF model's loss on the same two samples (fp32), at
  TP=1 x PP=1 and TP=2 x PP=2;
* 2 iterations + resume for 2 more give the same losses at iterations 3 and 4 as one run;
* DP=2 with the distributed optimizer gives DP=1's losses (same global batch);
* the loss of a small memorisable dataset falls steadily, evaluation runs on a held-out split;
* SIGTERM saves the current iteration and exits 0; kill -9 during a save leaves the
  previous checkpoint as the loadable latest one;
* the guide's launcher trains, and re-running it with LOAD_PATH = SAVE_PATH continues.
"""
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train_fixtures import (ROOT, convert, env, hf_loss_on_first_samples, losses, make_data, make_hf_model,
                                  run_training, train_flags, wait_for_line)

pytestmark = pytest.mark.slow  # torchrun / launcher runs: left out by -m "not slow"



@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    hf = make_hf_model(str(root / "hf"))
    return {
        "root": root, "hf": hf,
        "mm11": convert(hf, str(root / "mm_tp1_pp1"), 1, [2]),
        "mm22": convert(hf, str(root / "mm_tp2_pp2"), 2, [1, 1]),
        "data": make_data(str(root / "data"), hf),
    }


def _flags(tiny, ckpt, iters, **kw):
    return train_flags(tiny["data"], os.path.join(ckpt, "model.json"), iters=iters, **kw)


@pytest.fixture(scope="module")
def reference(tiny):
    """One uninterrupted 5-iteration run at TP=1 x PP=1, DP=1, GBS=2, MBS=1."""
    _, out = run_training(_flags(tiny, tiny["mm11"], 5, extra=["--load", tiny["mm11"]]))
    return losses(out)


def _close(a, b, rel=1e-5):
    return abs(a - b) <= rel * abs(b)


def test_iteration1_loss_equals_hf_tp1_and_tp2_pp2(tiny, reference):
    hf = hf_loss_on_first_samples(tiny["hf"], tiny["data"])
    _, out = run_training(_flags(tiny, tiny["mm22"], 1, tp=2, pp=2,
                                 extra=["--load", tiny["mm22"], "--pipeline-num-layers", "1,1"]), nprocs=4)
    tp2pp2 = losses(out)[1]
    assert _close(reference[1], hf), (reference[1], hf)
    assert _close(tp2pp2, hf), (tp2pp2, hf)


def test_resume_continues_exactly(tiny, reference):
    """DP=2 with the distributed optimizer (its sharded state is saved and restored too)."""
    save = str(tiny["root"] / "resume")
    dist = ["--use-distributed-optimizer"]
    _, first = run_training(_flags(tiny, tiny["mm11"], 2, extra=["--load", tiny["mm11"], "--save", save, *dist]),
                            nprocs=2)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "2"
    assert os.path.isfile(os.path.join(save, "iter_0000002", "mp_rank_00", "distrib_optim.pt"))
    _, second = run_training(_flags(tiny, tiny["mm11"], 4, extra=["--load", save, "--save", save, *dist]), nprocs=2)
    assert "at iteration 2" in second
    resumed = losses(second)
    assert sorted(resumed) == [3, 4], resumed
    for it in (3, 4):
        assert _close(resumed[it], reference[it]), (it, resumed[it], reference[it])
    assert "consumed samples:            8" in second


def test_dp2_distributed_optimizer_matches_dp1(tiny, reference):
    _, out = run_training(_flags(tiny, tiny["mm11"], 5, extra=["--load", tiny["mm11"], "--use-distributed-optimizer"]),
                          nprocs=2)
    dp2 = losses(out)
    assert sorted(dp2) == [1, 2, 3, 4, 5]
    for it in range(1, 6):
        assert _close(dp2[it], reference[it]), (it, dp2[it], reference[it])
    assert reference[5] < reference[1]  # it did learn something


def test_memorisable_loss_falls_and_evaluates(tiny):
    """60 iterations on 6 training samples (2 held out): every 10-iteration mean below the one
    before, the last below 20% of iteration 1's loss."""
    _, out = run_training(_flags(tiny, tiny["mm11"], 60, lr=3e-3, extra=[
        "--load", tiny["mm11"], "--lr-decay-style", "constant", "--split", "75,25,0",
        "--eval-interval", "30", "--eval-iters", "1", "--tensorboard-dir", str(tiny["root"] / "tb")]))
    curve = losses(out)
    assert sorted(curve) == list(range(1, 61))
    windows = [sum(curve[i] for i in range(k, k + 10)) / 10 for k in range(1, 61, 10)]
    assert all(b < a for a, b in zip(windows, windows[1:])), windows
    assert curve[60] < 0.2 * curve[1], (curve[1], curve[60])
    evals = [line for line in out.splitlines() if "validation loss at iteration" in line]
    assert len(evals) == 2 and all("lm loss value:" in e for e in evals), evals
    assert os.listdir(tiny["root"] / "tb")


def _start(flags, **kw):
    """pretrain_qwen2vl.py as one plain process (a cluster's SIGTERM goes to it directly)."""
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain_qwen2vl.py"), *flags], env=env(),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_saves_current_iteration_and_exits_0(tiny):
    save = str(tiny["root"] / "sigterm")
    proc = _start(_flags(tiny, tiny["mm11"], 1000, extra=["--load", tiny["mm11"], "--save", save]))
    head = wait_for_line(proc, "iteration        2/")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=240)
    out = head + rest
    assert proc.returncode == 0, out[-3000:]
    last = max(losses(out))
    assert "received SIGTERM" in out
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == str(last)
    assert os.path.isfile(os.path.join(save, f"iter_{last:07d}", "mp_rank_00", "model_optim_rng.pt"))


KILL_IN_SAVE = """
import os, sys, time, torch
_save, calls = torch.save, []
def hanging_save(obj, f, *a, **k):
    if isinstance(f, str) and f.endswith("model_optim_rng.pt"):
        calls.append(f)
    if len(calls) == 2 and f is calls[-1]:  # the second checkpoint: write half a file, then hang mid-save
        with open(f, "wb") as out:
            out.write(b"partial")
        open(os.environ["SAVE_STARTED"], "w").close()
        time.sleep(600)
    return _save(obj, f, *a, **k)
torch.save = hanging_save
sys.argv = sys.argv[1:]
import runpy
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_kill_9_during_save_keeps_previous_checkpoint(tiny, tmp_path):
    save = str(tiny["root"] / "kill9")
    marker = str(tmp_path / "save_started")
    wrapper = tmp_path / "kill_in_save.py"
    wrapper.write_text(KILL_IN_SAVE)
    flags = _flags(tiny, tiny["mm11"], 6, extra=["--load", tiny["mm11"], "--save", save, "--save-interval", "2"])
    proc = subprocess.Popen([sys.executable, str(wrapper), os.path.join(ROOT, "pretrain_qwen2vl.py"), *flags],
                            env=dict(env(), SAVE_STARTED=marker), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert os.path.exists(marker), "the second save never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "2"
    assert not os.path.exists(os.path.join(save, "iter_0000004"))  # only its temporary directory
    _, out = run_training(_flags(tiny, tiny["mm11"], 3, extra=["--load", save]))
    assert "at iteration 2" in out and sorted(losses(out)) == [3]
    assert math.isfinite(losses(out)[3])


def test_guide_launcher_trains_and_continues(tiny):
    save = str(tiny["root"] / "launcher")
    launcher_env = dict(env(), GPUS_PER_NODE="1", TP="1", PP="1", MBS="1", GBS="2", SEQ_LEN="512",
                        PRECISION="fp32", MM_DATA=tiny["data"], MM_MODEL=os.path.join(tiny["mm11"], "model.json"),
                        LOAD_PATH=tiny["mm11"], SAVE_PATH=save, LOG_DIR=str(tiny["root"] / "logs"),
                        MASTER_PORT=str(__import__("tests.multiproc", fromlist=["free_port"]).free_port()))
    script = os.path.join(ROOT, "examples", "qwen2vl", "finetune_qwen2vl_7b.sh")
    first = subprocess.run(["bash", script, "--train-iters", "2", "--device", "cpu"], env=launcher_env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert sorted(losses(first.stdout)) == [1, 2]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "2"
    launcher_env.update(LOAD_PATH=save, TRAIN_ITERS="3")
    second = subprocess.run(["bash", script, "--device", "cpu", "--override-opt-param-scheduler"], env=launcher_env, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, (second.stdout + second.stderr)[-3000:]
    assert "at iteration 2" in second.stdout and sorted(losses(second.stdout)) == [3]
