"""User-facing errors and the guard that prints them as one line.

Raise :class:`UserError` (or a subclass) for a user's mistake: a missing file,
a bad key, an impossible flag combination.  Entry points wrap their ``main``
with :func:`cli_main`, which prints ``error: <message>`` and exits 2 instead
of a traceback.  Bugs still raise normally.
"""
import functools
import sys


class UserError(Exception):
    """A mistake in the user's input; the message names the file, key or flag."""


def cli_main(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
