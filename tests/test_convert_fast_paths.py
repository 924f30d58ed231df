"""The export's byte-copy path (checkpoint/export_plan.py) writes the very bytes the in-memory path writes.

Each case exports the same checkpoint twice, once as the CLI does (rank files read as byte ranges) and once
with that path switched off (tensors merged and transformed in memory, written by safetensors), and
compares every output file byte for byte: tied and untied, TP 1 and 2, pipeline splits with an empty-LLM
first stage, bf16, several shards, and rank files written by torch.save itself (one non-contiguous).
"""
import os

import pytest
import torch

from checkpoint import convert, export_plan
from checkpoint.convert import convert_hf_to_mm, convert_mm_to_hf
from checkpoint.export_plan import RankFile, safetensors_header
from tests.test_convert_roundtrip import _write_hf_dir


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    return {tied: _write_hf_dir(base / f"tied{int(tied)}", tied, internal_sharded=True) for tied in (False, True)}


def _files(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


def _export_both(mm, src, out, monkeypatch, **kwargs):
    """(fast files, slow files, how many tensors the fast path built in memory)."""
    built = []
    real_plan = export_plan.plan_export

    def counting_plan(*args, **kw):
        pieces = real_plan(*args, **kw)
        built.extend(n for n, p in pieces.items() if p.tensor is not None)
        return pieces

    monkeypatch.setattr(convert, "plan_export", counting_plan)
    convert_mm_to_hf(str(mm), str(out / "fast"), str(src), progress=False, **kwargs)
    monkeypatch.setattr(convert, "read_rank_files", lambda paths: None)  # the in-memory path
    convert_mm_to_hf(str(mm), str(out / "slow"), str(src), progress=False, **kwargs)
    monkeypatch.undo()
    return _files(out / "fast"), _files(out / "slow"), built


@pytest.mark.parametrize("tied,tp,layer_index,dtype", [
    (False, 1, None, None),
    (True, 1, None, None),
    (False, 2, [0, 0, 2], None),
    (True, 2, [0, 1], None),
    (True, 2, [0, 0, 2], "bf16"),
])
def test_export_byte_copies_equal_in_memory_export(hf_dirs, tmp_path, monkeypatch, tied, tp, layer_index, dtype):
    src, mm = hf_dirs[tied], tmp_path / "mm"
    convert_hf_to_mm(str(src), str(mm), tensor_parallel_size=tp, pipeline_layer_index=layer_index,
                     params_dtype=dtype, progress=False)
    fast, slow, built = _export_both(mm, src, tmp_path, monkeypatch)
    assert list(fast) == list(slow)
    for name in fast:
        assert fast[name] == slow[name], name
    assert built == []  # every tensor as byte ranges, the patch embedding's reshape included


def test_several_shards(hf_dirs, tmp_path, monkeypatch):
    src, mm = hf_dirs[False], tmp_path / "mm"
    convert_hf_to_mm(str(src), str(mm), tensor_parallel_size=2, pipeline_layer_index=[0, 1], progress=False)
    fast, slow, _ = _export_both(mm, src, tmp_path, monkeypatch, max_shard_bytes=200_000)
    assert len([f for f in fast if f.endswith(".safetensors")]) > 2
    assert fast == slow


def test_rank_files_written_by_torch_save(hf_dirs, tmp_path, monkeypatch):
    """A training checkpoint (torch.save's own writer, extra entries, a non-contiguous tensor) exports the same."""
    src, mm = hf_dirs[True], tmp_path / "mm"
    convert_hf_to_mm(str(src), str(mm), tensor_parallel_size=2, pipeline_layer_index=[0, 1], progress=False)
    odd = "language_model.decoder.layers.0.mlp.linear_fc2.weight"
    for rank in sorted((mm / "release").glob("mp_rank_*")):
        path = rank / "model_optim_rng.pt"
        saved = torch.load(path, weights_only=False)
        if odd in saved["model"]:
            t = saved["model"][odd]
            saved["model"][odd] = t.t().contiguous().t()  # same values, column-major storage
            assert not saved["model"][odd].is_contiguous()
        saved["model"]["language_model.decoder.layers.0.self_attention.core_attention._extra_state"] = None
        saved["args_like"] = {"lr": 1e-5, "layout": [1, 2]}
        # as megatron's non-distributed optimizer pickles its fp32 copies: Parameters (the rank file is still
        # read without torch: the plan below runs)
        saved["optimizer"] = {"fp32_from_fp16_params": [[torch.nn.Parameter(torch.randn(4))]]}
        torch.save(saved, path)
    records = RankFile(str(mm / "release" / "mp_rank_00_001" / "model_optim_rng.pt")).records
    assert odd not in records and records  # the non-contiguous one is left to the in-memory path
    fast, slow, built = _export_both(mm, src, tmp_path, monkeypatch)
    assert fast == slow
    # local layer 0 of both stages (global layers 0 and 1) went through memory, the rest as byte ranges
    assert sorted(built) == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]


def test_header_is_safetensors_own(tmp_path):
    from safetensors.torch import save_file

    tensors = {"b": torch.ones(3, dtype=torch.bfloat16), "a": torch.ones(2, 2), "c": torch.ones(1, dtype=torch.float16),
               "d": torch.ones(5, dtype=torch.bfloat16), "e": torch.ones(2, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    pieces = {n: export_plan.Piece(t.dtype, t.shape, tensor=t) for n, t in tensors.items()}  # torch dtypes taken
    header, _ = safetensors_header(pieces, {"format": "pt"})
    assert (tmp_path / "x.safetensors").read_bytes()[:len(header)] == header


def test_byte_copy_commands_never_import_torch(hf_dirs, tmp_path):
    """Both commands, run as a user runs them on a checkpoint of one dtype, plan and copy without torch
    (its import is ~2.5 s of start-up on a small machine); the export then equals the source."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    probe = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as exc:\n    assert not exc.code, exc.code\nprint('torch imported:', 'torch' in sys.modules)")
    src, mm, out = hf_dirs[False], tmp_path / "mm", tmp_path / "out"
    for script, *args in (
            ("qwen2vl_convert_to_mm_ckpt.py", "--load-dir", str(src), "--save-dir", str(mm),
             "--tensor-parallel-size", "2", "--pipeline-layer-index", "0,1"),
            ("qwen2vl_convert_to_hf.py", "--load-dir", str(mm), "--save-dir", str(out), "--hf-dir", str(src))):
        run = subprocess.run([sys.executable, "-c", probe, os.path.join(root, "examples/qwen2vl", script), *args,
                              "--no-progress"], capture_output=True, text=True, cwd=root)
        assert run.returncode == 0, run.stderr
        assert "torch imported: False" in run.stdout, run.stdout
    from tests.test_convert_roundtrip import _read_folder

    ours, theirs = _read_folder(out), _read_folder(src)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_virtual_pipeline_rank_files_refused(hf_dirs, tmp_path):
    """A rank file with model0/model1 entries is not read as byte ranges: the in-memory reader names it."""
    from mindspeed_mm.errors import UserError

    src, mm = hf_dirs[True], tmp_path / "mm"
    convert_hf_to_mm(str(src), str(mm), tensor_parallel_size=1, pipeline_layer_index=[0], progress=False)
    path = mm / "release" / "mp_rank_00" / "model_optim_rng.pt"
    saved = torch.load(path, weights_only=False)
    saved["model0"] = saved["model"]
    torch.save(saved, path)
    with pytest.raises(UserError, match="virtual-pipeline"):
        convert_mm_to_hf(str(mm), str(tmp_path / "out"), str(src), progress=False)
    assert not (tmp_path / "out").exists()
