"""The launcher's terminal: every line goes to the log; the terminal gets one line per mistake.

    ... | python -m mindspeed_mm.training.console LOGFILE

A user's mistake found by the training processes is printed by each of them as
``error: ...`` (mindspeed_mm.errors.cli_main) and then torchrun adds its failure report
(ChildFailedError, a traceback and a table per rank).  After the first ``error:`` line the
terminal gets nothing more (the log keeps all of it), and the line is written to
``LOGFILE.error`` so the launcher can exit 2 instead of torchrun's 1.  Output before it (progress,
warnings, the traceback of a real crash) passes through unchanged.  SIGTERM/SIGINT are ignored:
this process must outlive a pre-emption to record the final save.
"""
import signal
import sys


def main(logfile: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    failed = False
    stdin = sys.stdin.buffer
    out = sys.stdout.buffer
    with open(logfile, "ab", buffering=0) as log:
        for line in iter(stdin.readline, b""):
            log.write(line)
            if failed:
                continue
            out.write(line)
            out.flush()
            if line.startswith(b"error: "):
                failed = True
                with open(logfile + ".error", "wb") as f:
                    f.write(line)


if __name__ == "__main__":
    main(sys.argv[1])
