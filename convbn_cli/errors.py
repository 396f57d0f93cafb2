"""The errors convbn reports to users: one line each, with the exit code the CLI ends with.

Kept free of TensorFlow so that the CLI can catch them without importing it.
"""


class ConvbnError(Exception):
    """A problem a user can fix (bad config, data file, checkpoint, run directory): exit code 2."""

    exit_code = 2

    @property
    def lines(self):
        return [str(self)]
