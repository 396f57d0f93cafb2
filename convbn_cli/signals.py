"""Signal handlers installed for a while and then put back: the one way convbn sets them.

Who sets them, innermost last: the CLI's group (SIGTERM raises Terminated for every command), a sweep (Ctrl-C and
SIGTERM are only noted between runs), a training (events.StopOnSignal: a checkpoint at the next step) and the
trainer's checkpoint write at a signal (both ignored: a second Ctrl-C must not cut it in half). Each puts back
what it found, so the outer handler is in force again when the inner work ends.

Python sets handlers only in the main thread (signal.signal raises ValueError elsewhere); convbn run in another
thread (a notebook's worker, a test runner's) then leaves signals alone instead of failing.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # what ends a convbn command (exit 128 + the signal's number)


def stop_signals(handler) -> dict:
    """{SIGINT: handler, SIGTERM: handler}."""
    return {s: handler for s in STOP_SIGNALS}


def install(handlers: dict):
    """Set `handlers` ({signal number: handler}); returns a function that puts the previous handlers back (once:
    calling it again does nothing). Outside the main thread nothing is set."""
    old = {}
    for s, handler in handlers.items():
        try:
            old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass

    def restore():
        for s, handler in old.items():
            if handler is not None:  # None: set outside Python, which Python cannot set again; leave ours
                signal.signal(s, handler)
        old.clear()

    return restore


@contextlib.contextmanager
def handled(handlers: dict):
    """`handlers` in force for the duration of the `with` block, the previous ones after it (also on an error)."""
    restore = install(handlers)
    try:
        yield
    finally:
        restore()
