"""The CPU shim changes nothing plain torch / transformers code computes.

A Hugging Face Qwen2-VL forward + backward (loss and every gradient), the same model
through ``from_pretrained`` (built under ``with torch.device('meta')``) and seeded draws
must be bit-identical without the shim, after it in the same process, and in a process
that installs it before anything else (as a conftest calling setup_platform would).
Each runs in a fresh process: the shim patches torch for good.
"""
import torch

from tests.multiproc import run_ranks


def _compute(hf_dir: str) -> dict:
    from transformers import Qwen2VLForConditionalGeneration

    from tests.hf_reference import hf_config, hf_forward, hf_model, make_batch

    out = {"threads": torch.get_num_threads()}
    for name, build in (("built", lambda: hf_model(hf_config())),
                        ("loaded", lambda: Qwen2VLForConditionalGeneration.from_pretrained(
                            hf_dir, dtype=torch.float32, attn_implementation="eager").eval())):
        model = build()
        res = hf_forward(model, make_batch())
        res.loss.backward()
        out[name] = {"loss": res.loss.detach(), "logits": res.logits.detach(),
                     **{f"grad:{n}": p.grad for n, p in model.named_parameters()},
                     **{f"buffer:{n}": b for n, b in model.named_buffers()}}
    torch.manual_seed(1234)
    out["draws"] = {"randn": torch.randn(64), "rand": torch.rand(8, 8), "randint": torch.randint(0, 9, (32,)),
                    "randperm": torch.randperm(50), "dropout": torch.nn.functional.dropout(torch.ones(64), 0.5),
                    "normal_": torch.empty(16).normal_()}
    return out


def _worker(rank, world, hf_dir, shim_first, out):
    from mindspeed_mm.platform import setup_platform

    if shim_first:
        setup_platform("cpu")
        results = {"shim first": _compute(hf_dir)}
    else:
        before = _compute(hf_dir)
        setup_platform("cpu")
        results = {"before": before, "after": _compute(hf_dir)}
    torch.save(results, out)  # a file: tensors through the queue would be shared memory of an exited process


def _diffs(ref: dict, got: dict, where: str):
    bad = []
    for key in ("built", "loaded", "draws"):
        assert ref[key].keys() == got[key].keys(), (where, key)
        bad += [f"{where}: {key} {k}" for k in ref[key] if not torch.equal(ref[key][k], got[key][k])]
    if ref["threads"] != got["threads"]:
        bad.append(f"{where}: threads {ref['threads']} -> {got['threads']}")
    return bad


def test_hf_computations_are_bit_identical_with_the_shim(tmp_path):
    from tests.hf_reference import hf_config, hf_model

    hf_dir = str(tmp_path / "hf")
    hf_model(hf_config()).save_pretrained(hf_dir)
    same, first = (str(tmp_path / f"{name}.pt") for name in ("same", "first"))
    run_ranks(_worker, 1, timeout=300, hf_dir=hf_dir, shim_first=False, out=same)
    run_ranks(_worker, 1, timeout=300, hf_dir=hf_dir, shim_first=True, out=first)
    same, first = torch.load(same), torch.load(first)
    ref = same["before"]
    assert torch.isfinite(ref["built"]["loss"]) and torch.isfinite(ref["loaded"]["loss"])
    bad = _diffs(ref, same["after"], "after setup_platform") + _diffs(ref, first["shim first"], "shim first")
    assert not bad, "\n".join(bad)
