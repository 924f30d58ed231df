"""The converters' user-facing mistakes, through the entry scripts as a user runs them (subprocesses):
exit 2, exactly one ``error:`` line, no traceback, nothing half-written.  Also what a good run records
(layout.json, both stage-list spellings) and the permissions its files get.
"""
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch

from checkpoint.convert import convert_hf_to_mm
from tests.test_convert_roundtrip import _write_hf_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TO_MM, TO_HF = "qwen2vl_convert_to_mm_ckpt.py", "qwen2vl_convert_to_hf.py"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return _write_hf_dir(tmp_path_factory.mktemp("hf") / "tiny", tied=False, internal_sharded=False)


@pytest.fixture(scope="module")
def mm(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("mm") / "mm"
    convert_hf_to_mm(str(src), str(out), tensor_parallel_size=2, pipeline_num_layers=[1, 2], progress=False)
    return out


def _run(script, *args, preexec_fn=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples/qwen2vl", script), *args, "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, preexec_fn=preexec_fn)


def _one_error(run, *needles):
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _nothing_left(folder, save):
    assert not os.path.exists(save)
    assert not [f for f in os.listdir(folder) if ".tmp-" in f or ".old-" in f]


def test_both_stage_spellings_and_layout_json(src, tmp_path):
    save = tmp_path / "comma"
    run = _run(TO_MM, "--load-dir", str(src), "--save-dir", str(save), "--tensor-parallel-size", "2",
               "--pipeline-layer-index", "0,1")
    assert run.returncode == 0, run.stderr
    layout = json.loads((save / "release" / "layout.json").read_text())
    assert layout == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2, "pipeline_num_layers": [1, 2]}
    assert sorted(os.listdir(save / "release")) == ["layout.json", "mp_rank_00_000", "mp_rank_00_001",
                                                    "mp_rank_01_000", "mp_rank_01_001"]
    # the export checks the recorded layout against the rank files
    (save / "release" / "layout.json").write_text(json.dumps(dict(layout, pipeline_num_layers=[2, 1])))
    out = tmp_path / "hf"
    _one_error(_run(TO_HF, "--load-dir", str(save), "--save-dir", str(out), "--hf-dir", str(src)),
               "layout.json: records TP 2, PP 2 with LLM layers [2, 1]", "rank files hold TP 2, PP 2 with LLM layers [1, 2]")
    _nothing_left(tmp_path, out)


def test_space_separated_counts_in_process(src, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("to_mm", os.path.join(ROOT, "examples/qwen2vl", TO_MM))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for given in (["1", "2"], ["1,2"], ["[1,", "2]"]):
        assert module.parse_args(["--pipeline-num-layers", *given]).pipeline_num_layers == [1, 2]
    assert module.parse_args(["--pipeline-layer-index", "0", "0,10", "20"]).pipeline_layer_index == [0, 0, 10, 20]


def test_refuses_splits_training_refuses(src, tmp_path):
    save = tmp_path / "out"
    # 3 LLM layers: stages [3, 0] leave the last stage (norm, output layer, loss) without a layer
    _one_error(_run(TO_MM, "--load-dir", str(src), "--save-dir", str(save), "--pipeline-layer-index", "0", "3"),
               "--pipeline-layer-index 0,3", "last pipeline stage must hold at least one LLM layer")
    _one_error(_run(TO_MM, "--load-dir", str(src), "--save-dir", str(save), "--pipeline-num-layers", "1,x"),
               "--pipeline-num-layers", "expected integers")
    _nothing_left(tmp_path, save)


def test_truncated_safetensors(src, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    weights = bad / "model.safetensors"
    size = os.path.getsize(weights)
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    save = tmp_path / "out"
    _one_error(_run(TO_MM, "--load-dir", str(bad), "--save-dir", str(save), "--pipeline-layer-index", "0"),
               f"{weights}: truncated")
    _nothing_left(tmp_path, save)


def _file_size_limit(nbytes):
    def limit():  # writes past nbytes fail with EFBIG, as they fail with ENOSPC on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@pytest.mark.parametrize("dtype", [None, "bf16"])  # kernel byte copies; in-memory cast
def test_full_disk_converting(src, tmp_path, dtype):
    save = tmp_path / "out"
    extra = ["--params-dtype", dtype] if dtype else []
    line = _one_error(_run(TO_MM, "--load-dir", str(src), "--save-dir", str(save), "--pipeline-layer-index", "0",
                           *extra, preexec_fn=_file_size_limit(64 * 1024)),
                      "model_optim_rng.pt: no space left on device", "File too large")
    assert str(save) in line
    _nothing_left(tmp_path, save)


def test_full_disk_exporting(src, mm, tmp_path):
    save = tmp_path / "hf"
    _one_error(_run(TO_HF, "--load-dir", str(mm), "--save-dir", str(save), "--hf-dir", str(src),
                    preexec_fn=_file_size_limit(64 * 1024)), "no space left on device")
    _nothing_left(tmp_path, save)


def test_export_shapes_disagreeing_with_model_json(src, mm, tmp_path):
    ckpt = tmp_path / "mm"
    shutil.copytree(mm, ckpt)
    rank = ckpt / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    saved = torch.load(rank, weights_only=False)
    name = "language_model.decoder.layers.0.mlp.linear_fc1.weight"
    want = list(saved["model"][name].shape)
    saved["model"][name] = torch.zeros(want[0] // 2, want[1])  # e.g. trained with another intermediate_size
    torch.save(saved, rank)
    save = tmp_path / "hf"
    _one_error(_run(TO_HF, "--load-dir", str(ckpt), "--save-dir", str(save), "--hf-dir", str(src)),
               str(rank), name, f"has shape {[want[0] // 2, want[1]]}", f"model.json at TP 2 asks {want}")
    _nothing_left(tmp_path, save)


def test_files_follow_the_umask(src, mm, tmp_path):
    hf = tmp_path / "src"
    shutil.copytree(src, hf)
    for f in os.listdir(hf):
        os.chmod(hf / f, 0o600)  # a private download: the export's permissions come from the umask, not from it
    save, out = tmp_path / "mm", tmp_path / "hf"

    def umask_022():
        os.umask(0o022)
    run = _run(TO_MM, "--load-dir", str(hf), "--save-dir", str(save), "--pipeline-layer-index", "0,1",
               preexec_fn=umask_022)
    assert run.returncode == 0, run.stderr
    run = _run(TO_HF, "--load-dir", str(save), "--save-dir", str(out), "--hf-dir", str(hf), preexec_fn=umask_022)
    assert run.returncode == 0, run.stderr
    for top in (save, out):
        assert stat.S_IMODE(os.stat(top).st_mode) == 0o755, top
        for folder, dirs, files in os.walk(top):
            for d in dirs:
                assert stat.S_IMODE(os.stat(os.path.join(folder, d)).st_mode) == 0o755, (folder, d)
            for f in files:
                assert stat.S_IMODE(os.stat(os.path.join(folder, f)).st_mode) == 0o644, (folder, f)
    assert (save / "model.json").exists() and (out / "config.json").exists()


def test_damaged_rank_files_exporting(src, mm, tmp_path):
    """A rank file whose pickle is damaged, or that holds something other than a tensor for a parameter,
    is one line naming it (both readers: the byte-range one gives way to torch.load's, which names it)."""
    import zipfile

    damaged = tmp_path / "damaged"
    shutil.copytree(mm, damaged)
    rank = damaged / "release" / "mp_rank_01_001" / "model_optim_rng.pt"
    with zipfile.ZipFile(rank) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    with open(rank, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + name_len + extra_len)
        f.write(b"\xff" * 8)  # not a pickle opcode
    save = tmp_path / "out"
    _one_error(_run(TO_HF, "--load-dir", str(damaged), "--save-dir", str(save), "--hf-dir", str(src)),
               str(rank), "cannot read")
    _nothing_left(tmp_path, save)

    odd = tmp_path / "odd"
    shutil.copytree(mm, odd)
    rank = odd / "release" / "mp_rank_00_001" / "model_optim_rng.pt"
    saved = torch.load(rank, weights_only=False)
    name = next(k for k in saved["model"] if k.endswith("mlp.linear_fc2.weight"))
    saved["model"][name] = None
    torch.save(saved, rank)
    _one_error(_run(TO_HF, "--load-dir", str(odd), "--save-dir", str(save), "--hf-dir", str(src)),
               name, "not a tensor")
    _nothing_left(tmp_path, save)
