"""A training job must not outlive its launcher.

The launcher starts torchrun in its own session (so that Ctrl-C and SIGTERM reach only the
launcher, which hands them to the training processes for a clean save).  A ``kill -9`` of the
launcher's process group then misses torchrun and its workers: they would go on training and
saving.  So torchrun is started through :func:`exec_with_parent_death_signal` (the kernel kills
it when the launcher dies), and each training process watches its own parent (torchrun): when
that parent is gone the process kills itself.
"""
import ctypes
import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1


def _set_parent_death_signal(sig: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def exec_with_parent_death_signal(argv) -> None:
    """``python -m mindspeed_mm.training.orphans CMD ...``: exec CMD, killed (SIGKILL) when the
    process that started it dies.  The signal survives exec."""
    parent = os.getppid()
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    os.execvp(argv[0], argv)


def exit_with_parent(poll_seconds: float = 1.0) -> None:
    """Kill this process when its parent ends (reparenting shows as a new parent pid).

    A polling thread rather than PR_SET_PDEATHSIG: that signal fires when the parent *thread*
    that forked us ends, and torchrun may start workers from a thread."""
    parent = os.getppid()
    if parent == 1 or "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # only under torchrun: a plain `nohup python ...` must survive its shell
    stop = threading.Event()

    def watch():
        while not stop.wait(poll_seconds):
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m mindspeed_mm.training.orphans CMD [ARGS...]")
    exec_with_parent_death_signal(sys.argv[1:])
