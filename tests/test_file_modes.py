"""Files the project writes through its atomic writers follow the umask, as a plain open() does
(a serving container running as another user must be able to read them)."""
import os
import stat

from mindspeed_mm.inference.batch import jsonl_writer
from mindspeed_mm.jsonio import write_json_atomic


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writers_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with jsonl_writer(str(tmp_path / "answers.jsonl")) as write:
            write({"id": 0})
        write_json_atomic(str(tmp_path / "model.json"), {"a": 1})
        assert _mode(tmp_path / "answers.jsonl") == 0o644
        assert _mode(tmp_path / "model.json") == 0o644
        os.umask(0o077)
        write_json_atomic(str(tmp_path / "private.json"), {"a": 1})
        assert _mode(tmp_path / "private.json") == 0o600
    finally:
        os.umask(old)
