"""scripts/device_check.sh --dry-run: the prepared accelerator check starts and passes its CPU-runnable rows
(the model against HF, SDPA varlen against a per-segment fp64 reference, packed == unpacked, the packed MFU
loop), and without a GPU the real run stops with one error line."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    env.pop("OUT", None)
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "device_check.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_dry_run_passes_every_cpu_row():
    proc = _run("--dry-run")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and " check " not in line]
    results = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in rows}
    for check in ("model (fp32 on CPU) vs HF fp32: logits", "model (fp32 on CPU) vs HF fp32: loss",
                  "packed == unpacked: logits of each sample", "packed == unpacked: summed loss",
                  "training loop (setup)"):
        assert results.get(check) == "PASS", (check, results)
    assert not [c for c, r in results.items() if r == "FAIL"], results
    assert "0 failed" in proc.stdout


def test_without_a_gpu_the_real_run_is_one_error_line():
    proc = _run(timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--dry-run" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
