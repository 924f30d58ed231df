import json
import os
import subprocess
import sys
import time

import pytest

from mindspeed_mm.data.llava import convert_file, convert_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "qwen2vl", "llava_instruct_2_mllm_demo_format.py")
SAMPLE = "/work/shared/samples/llava_instruct_sample.json"


def _rec(rid, image, convs):
    return {"id": rid, "image": image, "conversations": [{"from": f, "value": v} for f, v in convs]}


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "train2017"
    d.mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (d / name).write_bytes(b"x")
    return str(d)


def test_converts_roles_and_keeps_placeholder(image_dir):
    recs = [_rec("1", "a.jpg", [("human", "What is it?\n<image>"), ("gpt", "A cat."),
                                 ("human", "Colour?"), ("gpt", "Black.")])]
    out, stats = convert_records(recs, image_dir)
    assert stats.written == 1 and not stats.skipped
    assert out == [{"images": [os.path.join(image_dir, "a.jpg")], "messages": [
        {"role": "user", "content": "What is it?\n<image>"}, {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Black."}]}]


def test_skips_bad_records_by_reason(image_dir):
    recs = [
        _rec("ok", "b.jpg", [("human", "<image>\nDescribe."), ("gpt", "A dog.")]),
        _rec("missing", "zzz.jpg", [("human", "<image>\nDescribe."), ("gpt", "A dog.")]),
        _rec("role", "a.jpg", [("human", "<image>\nHi"), ("bot", "Hello")]),
        _rec("order", "a.jpg", [("gpt", "<image>\nHi"), ("human", "Hello")]),
        _rec("empty", "a.jpg", []),
        _rec("noimgtag", "a.jpg", [("human", "Hi"), ("gpt", "Hello")]),
        {"id": "noconv", "image": "a.jpg"},
        "not a record",
    ]
    seen = []
    out, stats = convert_records(recs, image_dir, report=lambda r, i, d: seen.append((r, i)))
    assert [m["messages"][1]["content"] for m in out] == ["A dog."]
    assert stats.skipped == {"missing_image": 1, "unknown_role": 1, "malformed": 5}
    assert ("unknown_role", "role") in seen and ("malformed", "order") in seen


def test_cli_sample_file(tmp_path):
    img = tmp_path / "imgs"
    img.mkdir()
    (img / "000000000001.jpg").write_bytes(b"x")
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, SCRIPT, "--llava-json", SAMPLE, "--image-dir", str(img),
                        "--output", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert len(data) == 1 and len(data[0]["messages"]) == 4
    assert "written 1, skipped 1 (missing_image=1)" in r.stderr.splitlines()[-1]


def test_cli_malformed_json_one_line_error_no_output(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"id": "1",\n   "image": }\n]')
    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, SCRIPT, "--llava-json", str(bad), "--output", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "line 3, column 13" in r.stderr
    assert not out.exists()


def test_missing_input_file_error(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--llava-json", str(tmp_path / "nope.json"),
                        "--output", str(tmp_path / "o.json")], capture_output=True, text=True)
    assert r.returncode == 2 and "nope.json" in r.stderr and "Traceback" not in r.stderr


def test_150k_records_fast(tmp_path, image_dir):
    recs = [_rec(str(i), "abc"[i % 3] + ".jpg",
                 [("human", "<image>\nWhat is happening in this picture?"), ("gpt", "Some text " * 20),
                  ("human", "And then?"), ("gpt", "More text " * 10)]) for i in range(150_000)]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(recs))
    t0 = time.perf_counter()
    stats = convert_file(str(src), image_dir, str(tmp_path / "out.json"), log=lambda m: None)
    elapsed = time.perf_counter() - t0
    assert stats.written == 150_000
    assert elapsed < 60, elapsed
