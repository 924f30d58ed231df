"""Cache building with several ranks on a node: one builds, the others wait for it."""

import threading
import time

import numpy as np

from mindspeed_mm.data.cache import get_or_build
from mindspeed_mm.data.preprocess import Sample


def _samples(n):
    return [Sample(np.arange(3, dtype=np.int32) + i, np.full(3, -100, np.int32), [], np.zeros((0, 3), np.int32))
            for i in range(n)]


def _run_ranks(path, n_samples, overwrite, builds):
    def build():
        builds.append(1)
        time.sleep(0.3)  # the waiters must really wait
        return _samples(n_samples), {"drop_counts": {}, "drop_lines": []}

    results = {}

    def rank(r):
        results[r] = get_or_build(path, build, is_builder=r == 0, overwrite=overwrite, poll_s=0.02,
                                  log=lambda m: None)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 2, 0)]  # waiters arrive first
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_one_rank_builds_others_wait(tmp_path):
    builds = []
    res = _run_ranks(str(tmp_path / "c"), 4, False, builds)
    assert len(builds) == 1 and sorted(res) == [0, 1, 2]
    assert all(len(c) == 4 for c in res.values())
    assert res[1].sample(2)[0].tolist() == [2, 3, 4]


def test_overwrite_waiters_do_not_take_the_stale_cache(tmp_path):
    path = str(tmp_path / "c")
    _run_ranks(path, 2, False, [])
    builds = []
    res = _run_ranks(path, 5, True, builds)
    assert len(builds) == 1
    assert all(len(c) == 5 for c in res.values())
