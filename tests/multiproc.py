"""Run a function on N gloo ranks in fresh processes; fail (never hang) on timeout."""
import multiprocessing as mp
import os
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world, port, queue, kwargs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    try:
        queue.put((rank, "ok", fn(rank, world, **kwargs)))
    except BaseException:  # report, do not hang the others
        queue.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world: int, timeout: float = 300, **kwargs):
    """Call ``fn(rank, world, **kwargs)`` on ``world`` processes; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, queue, kwargs), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            results[rank] = value
    except Exception as exc:  # queue.Empty: a rank hung
        errors.append(f"timed out after {timeout}s waiting for ranks ({type(exc).__name__})")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.1)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
