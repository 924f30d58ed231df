import subprocess
import sys

import pytest
import torch

from mindspeed_mm.platform import PlatformError, detect_device
from mindspeed_mm.platform.attention import allowed_mask


def _run(*args):
    return subprocess.run([sys.executable, "-m", "mindspeed_mm.platform", *args], capture_output=True, text=True)


def test_auto_detects_cpu_here():
    assert detect_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="machine has CUDA")
def test_wrong_device_is_one_line_error():
    for device, missing in (("npu", "torch_npu"), ("cuda", "torch.cuda.is_available")):
        res = _run("--device", device)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and missing in lines[0], res.stderr
        assert "Traceback" not in res.stderr
    with pytest.raises(PlatformError, match="unknown device"):
        detect_device("tpu")


def test_cli_reports_cpu():
    res = _run("--device", "cpu")
    assert res.returncode == 0 and "backend: gloo" in res.stdout


def test_varlen_mask_is_block_diagonal_and_causal_aligned():
    cu = torch.tensor([0, 2, 5])
    m = allowed_mask(5, 5, "cpu", causal=False, cu_q=cu, cu_k=cu)[0, 0]
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[:2, :2] = True
    expected[2:, 2:] = True
    assert torch.equal(m, expected)
    # decode step: one query sees the whole cache; a padded key stays hidden
    pad = torch.tensor([[True, False, False, False]]).view(1, 1, 1, 4)
    m = allowed_mask(1, 4, "cpu", causal=True, attention_mask=pad)
    assert m.flatten().tolist() == [False, True, True, True]
