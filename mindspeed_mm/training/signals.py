"""SIGTERM / SIGINT: finish the current iteration, save, exit 0 (a pre-empted cluster job).

The handler only records the signal; the loop asks :meth:`StopRequest.agreed`
after each iteration, which all-reduces the flag so that every rank stops at
the same iteration.  A second SIGINT (Ctrl-C twice) kills the process the
default way, for when the save itself hangs.  A repeated SIGTERM is the same
pre-emption delivered twice (by the cluster to every process and again by
torchrun or the launcher): it is ignored, and the sender escalates with SIGKILL.
"""
import signal

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.received = None
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received == signum == signal.SIGINT:  # asked twice: give up on the graceful path
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.received = signum

    def agreed(self, device) -> bool:
        """True on every rank when any rank received a signal (collective)."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "a signal on another rank"

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
