"""The training loop off the fp32 path: NaN/Inf losses, fp16 and bf16, pre-emption of the launcher.

* NaN losses (``--inject-nan-loss``, in fp16 where they really happen): each such update is
  skipped (weights, fp32 main weights, Adam moments, loss scale and schedule unchanged),
  counted in the log line, training continues after one, and 10 in a row stop the run
  with a one-line error, exit 2, no traceback;
* bf16: parameters bf16, gradients and optimizer fp32 (as the log says and the checkpoint
  holds), iteration 1's loss close to the HF fp32 model's, and a run resumed from the bf16
  checkpoint of iteration 2 through the guide's launcher gives the same iteration-3 loss;
* SIGTERM to the launcher's process group: the workers save and the whole job exits 0.
"""
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from mindspeed_mm.errors import UserError
from mindspeed_mm.training.config import iteration_set
from tests.multiproc import free_port
from tests.train_fixtures import (ROOT, convert, env, hf_loss_on_first_samples, losses, make_data, make_hf_model,
                                  train_flags, wait_for_line)

pytestmark = pytest.mark.slow  # torchrun / launcher runs: left out by -m "not slow"

LOG_LINE = re.compile(r"iteration\s+(\d+)/.*?\| lm loss: (\S+) \|.*?number of skipped iterations:\s+(\d+) \| "
                      r"number of nan iterations:\s+(\d+) \|")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_nan_bf16")
    hf = make_hf_model(str(root / "hf"))
    return {"root": root, "hf": hf, "mm": convert(hf, str(root / "mm"), 1, [2]),
            "data": make_data(str(root / "data"), hf)}


def _flags(tiny, precision, iters, extra):
    flags = train_flags(tiny["data"], os.path.join(tiny["mm"], "model.json"), iters=iters, extra=extra)
    flags[flags.index("--fp32")] = f"--{precision}"
    # The launcher's warmup flag (same single warmup step over the 10 decay iterations).
    i = flags.index("--lr-warmup-iters")
    flags[i:i + 2] = ["--lr-warmup-fraction", "0.1"]
    return flags


def _run(flags):
    """pretrain_qwen2vl.py as one plain process: (returncode, stdout, stderr)."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_qwen2vl.py"), *flags], cwd=ROOT,
                          env=dict(env(), MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _log(out):
    """{iteration: (lm loss, skipped, nan)} from the progress lines."""
    return {int(m[1]): (float(m[2]), int(m[3]), int(m[4])) for m in LOG_LINE.finditer(out)}


def _checkpoint(save, iteration):
    return torch.load(os.path.join(save, f"iter_{iteration:07d}", "mp_rank_00", "model_optim_rng.pt"),
                      map_location="cpu", weights_only=False)


def _tensors(obj, prefix=""):
    """Every tensor and number of a nested checkpoint entry, by path."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _tensors(value, f"{prefix}{key}.").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, value in enumerate(obj) for k, v in _tensors(value, f"{prefix}{i}.").items()}
    if torch.is_tensor(obj) or isinstance(obj, (int, float)):
        return {prefix: torch.as_tensor(obj)}
    return {}


def _trained_state(save, iteration):
    """What an update changes: weights, optimizer (fp32 main weights, moments, loss scale), schedule."""
    ckpt = _checkpoint(save, iteration)
    return _tensors({k: ckpt[k] for k in ("model", "optimizer", "opt_param_scheduler")})


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_inject_nan_loss_iterations():
    assert iteration_set("3-5,9", "--inject-nan-loss") == {3, 4, 5, 9}
    for bad in ("5-3", "0", "x", "2-"):
        with pytest.raises(UserError, match="--inject-nan-loss"):
            iteration_set(bad, "--inject-nan-loss")


def test_nan_losses_are_skipped_counted_and_stop_the_run(tiny):
    """fp16, NaN at 2-10 (9 in a row), a finite iteration 11, NaN again at 12-21 (10 in a row)."""
    save = str(tiny["root"] / "nan")
    nan_iters = set(range(2, 11)) | set(range(12, 22))
    rc, out, err = _run(_flags(tiny, "fp16", 30, [
        "--load", tiny["mm"], "--save", save, "--save-interval", "1", "--inject-nan-loss", "2-10,12-21",
        "--initial-loss-scale", "4096"]))
    assert rc == 2, (out + err)[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(
        "error: the loss was NaN/Inf in 10 iterations in a row (the last: iteration 21); "), err[-1000:]
    assert "fp16: parameters float16, gradients accumulated and reduced in float32, optimizer main parameters "\
           "float32" in out, out[:2000]

    log = _log(out)
    assert sorted(log) == list(range(1, 22)), sorted(log)
    for it, (loss, skipped, nans) in log.items():
        assert math.isnan(loss) == (it in nan_iters), (it, loss)
        assert nans == len([i for i in nan_iters if i <= it]), (it, nans)
        assert skipped == 0, (it, skipped)  # the fp16 loss scaler never skipped: only the NaN handling did

    # Nothing an update touches moves during NaN iterations; iteration 11 trains; no NaN leaks in.
    before, after_nans = _trained_state(save, 1), _trained_state(save, 10)
    trained = _trained_state(save, 11)
    assert _same(before, after_nans)
    assert not _same(after_nans, trained)
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert _same(trained, _trained_state(save, 20))
    # The run stopped without saving iteration 21: the latest checkpoint is the last good weights.
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "20"
    ckpt = _checkpoint(save, 11)
    assert {v.dtype for v in ckpt["model"].values() if torch.is_tensor(v)} == {torch.float16}
    assert {v.dtype for v in _tensors(ckpt["optimizer"]["fp32_from_fp16_params"]).values()} == {torch.float32}


@pytest.fixture(scope="module")
def bf16_run(tiny):
    """3 bf16 iterations (saving 2 and 3), with the launcher's distributed optimizer."""
    save = str(tiny["root"] / "bf16")
    rc, out, err = _run(_flags(tiny, "bf16", 3, ["--load", tiny["mm"], "--save", save, "--save-interval", "2",
                                                 "--use-distributed-optimizer"]))
    assert rc == 0, (out + err)[-3000:]
    return {"save": save, "out": out, "losses": losses(out)}


def test_bf16_trains_in_mixed_precision_close_to_hf(tiny, bf16_run):
    out, curve = bf16_run["out"], bf16_run["losses"]
    assert "bf16: parameters bfloat16, gradients accumulated and reduced in float32, optimizer main parameters "\
           "float32" in out, out[:2000]
    assert sorted(curve) == [1, 2, 3] and all(math.isfinite(v) for v in curve.values()), curve
    hf = hf_loss_on_first_samples(tiny["hf"], tiny["data"])
    print(f"iteration-1 loss: bf16 {curve[1]:.7f}, HF fp32 {hf:.7f}, relative {abs(curve[1] - hf) / hf:.2e}")
    assert abs(curve[1] - hf) <= 1e-2 * hf, (curve[1], hf)

    second, third = _checkpoint(bf16_run["save"], 2), _checkpoint(bf16_run["save"], 3)
    assert {v.dtype for v in third["model"].values() if torch.is_tensor(v)} == {torch.bfloat16}
    assert not _same(_tensors(second["model"]), _tensors(third["model"]))  # it trains
    # The distributed optimizer's fp32 main weights and Adam moments.
    shards = torch.load(os.path.join(bf16_run["save"], "iter_0000003", "mp_rank_00", "distrib_optim.pt"),
                        map_location="cpu", weights_only=False)
    float_dtypes = {v.dtype for v in _tensors(shards).values() if v.is_floating_point() and v.dim() > 0}
    assert float_dtypes == {torch.float32}, float_dtypes


def test_bf16_checkpoint_resumes_through_launcher_and_sigterm_exits_0(tiny, bf16_run):
    """The bf16 checkpoint of iteration 2 (as if the job was pre-empted there), resumed by the guide's
    launcher; SIGTERM to the launcher's process group after iteration 3: save, exit 0."""
    resume = str(tiny["root"] / "bf16_resume")
    shutil.copytree(os.path.join(bf16_run["save"], "iter_0000002"), os.path.join(resume, "iter_0000002"))
    shutil.copy(os.path.join(bf16_run["save"], "model.json"), resume)
    with open(os.path.join(resume, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("2\n")
    logs = tiny["root"] / "launcher_logs"
    launcher_env = dict(env(), GPUS_PER_NODE="1", TP="1", PP="1", MBS="1", GBS="2", PRECISION="bf16",
                        MM_DATA=tiny["data"], MM_MODEL=os.path.join(tiny["mm"], "model.json"), LOAD_PATH=resume,
                        SAVE_PATH=resume, LOG_DIR=str(logs), MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(
        ["bash", os.path.join(ROOT, "examples", "qwen2vl", "finetune_qwen2vl_7b.sh"),
         *_flags(tiny, "bf16", 1000, ["--load", resume, "--save", resume])],
        env=launcher_env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)  # its own process group, like a job's
    head = wait_for_line(proc, "iteration        3/")
    os.killpg(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=240)
    out = head + rest
    assert proc.returncode == 0, out[-3000:]
    assert "at iteration 2" in out and "received SIGTERM" in out, out[-3000:]
    resumed = losses(out)
    print(f"iteration-3 loss: resumed {resumed[3]!r}, uninterrupted {bf16_run['losses'][3]!r}")
    assert resumed[3] == bf16_run["losses"][3], (resumed[3], bf16_run["losses"][3])
    last = max(resumed)
    assert open(os.path.join(resume, "latest_checkpointed_iteration.txt")).read().strip() == str(last)
    logged = open(logs / os.listdir(logs)[0]).read()  # the log outlived the signal
    assert f"saved checkpoint {os.path.join(resume, f'iter_{last:07d}')}" in logged, logged[-2000:]
