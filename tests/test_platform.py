import subprocess
import sys

import pytest
import torch

from mindspeed_mm.platform import PlatformError, detect_device, setup_platform


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
    setup_platform("cpu")  # attention imports megatron-core: never before the shim
    from mindspeed_mm.platform.attention import allowed_mask

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


def test_core_attention_matches_reference_and_reuses_masks():
    """GQA + varlen + padding through CoreAttention equal an explicit softmax; masks are rebuilt on new inputs."""
    setup_platform("cpu")  # before megatron-core is imported
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from mindspeed_mm.platform.attention import CoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            attention_dropout=0.0, use_cpu_initialization=True)
    attn = CoreAttention(cfg, 1, AttnMaskType.no_mask, backend="sdpa")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 1, h, 8, generator=g) for h in (4, 2, 2))

    def reference(allowed):
        kk, vv = (t.repeat_interleave(2, dim=2) for t in (k, v))
        scores = torch.einsum("sbhd,tbhd->bhst", q, kk) / 8 ** 0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("bhst,tbhd->sbhd", probs, vv).reshape(6, 1, 32)

    for cu in (torch.tensor([0, 2, 6]), torch.tensor([0, 4, 6])):
        packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
        seg = torch.repeat_interleave(torch.arange(2), cu[1:] - cu[:-1])
        expected = reference(seg[:, None] == seg[None, :])
        for _ in range(2):  # second call hits the mask cache
            torch.testing.assert_close(attn(q, k, v, None, packed_seq_params=packed), expected)
    causal = CoreAttention(cfg, 1, AttnMaskType.causal, backend="sdpa")
    pad = torch.tensor([True, True, False, False, False, False]).view(1, 1, 1, 6)  # two left pads
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool)) & ~pad[0, 0]
    out = causal(q, k, v, pad)
    torch.testing.assert_close(out[2:], reference(allowed)[2:])
    assert torch.isfinite(out).all()
