"""`python -m convbn_cli` and the `convbn` executable (pyproject's console script names `entry`): the same command.

A Ctrl-C or SIGTERM at any moment ends convbn with "interrupted by SIGINT" (SIGTERM) and exit 130 (143), never a
traceback. While a command runs, the group (cli/group.py) and, inside it, training and sweeps handle the signal
and say so after their cleanup. Outside a command - while the command line's modules load (Click, the commands:
a noticeable part of a second on two cores), while Click parses the arguments, and after the command - nothing is
half-written, so the handlers installed here end the process at once. They stay installed throughout and, inside
a command, raise what the group expects (KeyboardInterrupt, Terminated), so that the command's cleanup runs.
The package's own __init__.py runs before this module can install anything: it must stay quick to import.
"""

import os
import signal
import sys

from .signals import install, stop_signals  # no dependencies: quick, like everything before the handlers

_INVOKE_CODES: frozenset = frozenset()  # the group's invoke and those it inherits: on the stack, a command runs


def _running_command(frame) -> bool:
    while frame is not None:
        if frame.f_code in _INVOKE_CODES:
            return True
        frame = frame.f_back
    return False


def _stop(signum, frame):
    if _running_command(frame):  # the group's own handling: cleanup in every `finally`, its message, its code
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        from .errors import Terminated

        raise Terminated(signum)
    # start-up or teardown: nothing half-written to clean up; os._exit, as an exception raised in the middle of an
    # import can be swallowed by a library's bare `except:` there
    os.write(2, f"interrupted by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


def entry():
    """Install the handlers, import the command line, run it (cli.group.entry, which exits)."""
    global _INVOKE_CODES
    install(stop_signals(_stop))  # for the life of the process: never restored
    from .cli import group  # the slow imports

    _INVOKE_CODES = frozenset(vars(cls)["invoke"].__code__ for cls in type(group.main).__mro__
                              if "invoke" in vars(cls))
    group.entry()


if __name__ == "__main__":
    sys.exit(entry())
