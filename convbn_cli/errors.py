"""The errors convbn reports to users: one line each, with the exit code the CLI ends with.

Kept free of TensorFlow so that the CLI can catch them without importing it. The exit codes (README, "Exit
codes"): 0 done; 2 bad input; 3 training diverged; 4 diagnose found problems; 128 + signal number when
interrupted; 1 anything else.
"""

import signal

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_FINDINGS = 4  # `convbn diagnose` found problems at or above --fail-on


class ConvbnError(Exception):
    """A problem a user can fix (bad config, data file, checkpoint, run directory). Subclasses may set another
    `exit_code` (see the module docstring); `lines` are printed one per line, each prefixed with "error: "."""

    exit_code = EXIT_BAD_INPUT

    @property
    def lines(self):
        return [str(self)]


class ConfigError(ConvbnError):
    """A config that cannot be used; `problems` holds one line per problem, each naming its dotted key."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    @property
    def lines(self):
        return self.problems


class DataError(ConvbnError):
    """A data file or source that cannot be used."""


class TargetError(ConvbnError):
    """A TARGET (run directory, checkpoint, exported model) that is missing, unreadable, or does not fit."""


class WriteError(ConvbnError):
    """A file or directory convbn could not write (a full disk, a read-only or unwritable place). `path` is the
    one the user knows (the destination, never a temporary's name), `cause` what the machine said, in a few
    words (files.write_error makes these)."""

    def __init__(self, path, cause: str):
        self.path, self.cause = str(path), cause
        super().__init__(f"{path}: {cause}")


class Stopped(BaseException):
    """A signal (SIGINT, SIGTERM) ended the command: not an error, and the exit code is 128 + signal number.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way up (around a damaged
    file's many failure modes, say) can swallow it or report it as bad input."""

    def __init__(self, signum, message=None):
        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")


class Terminated(Stopped):
    """SIGTERM ended a command while it was not training (training saves a checkpoint first: Interrupted)."""
