"""The `convbn` command line: thin Click commands over the importable modules.

Each command parses its options, calls one function and prints a report (present/reports.py). Errors are handled
once, on the group: a ConvbnError (or an OSError: a full disk, an unwritable path) becomes one line per problem and
its exit code (errors.py); no traceback for bad input. TensorFlow is imported inside the commands that need it,
after what they were pointed at has been checked.

    group.py     the group, its global flags (common.Session), the error handler, the executable
    common.py    the Session, the options several commands take, the checks made before TensorFlow loads
    training.py  validate, train, sweep
    models.py    eval, predict, inspect-bn, diagnose, recalibrate, export, report
    browse.py    runs, configs, data
"""

from .group import entry, main

__all__ = ["entry", "main"]
