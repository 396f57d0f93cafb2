"""`convbn train --resume RUN_DIR [overrides]`: which settings may change, and the run opened once."""

from __future__ import annotations

from dataclasses import dataclass

from .rundir import RunDir, RunDirError

# The weights do not depend on these; anything else would not fit the checkpoint or the run's metrics.
RESUMABLE = ("train.epochs", "distribute.")


@dataclass
class Resume:
    run: RunDir
    config: object  # the run's config with the overrides applied
    overrides: tuple  # what changed: the config is rewritten at the end when there were any


def open_for_resume(run_dir, overrides=()) -> Resume:
    """Open RUN_DIR for resuming with `overrides` (only train.epochs and distribute.* may change)."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    bad = [o for o, k in zip(overrides, keys) if k != RESUMABLE[0] and not k.startswith(RESUMABLE[1])]
    if bad:
        raise RunDirError("--resume: only train.epochs and distribute.* may change when resuming, got "
                          + ", ".join(bad))
    run = RunDir.open(run_dir)
    return Resume(run, run.load_config(overrides), tuple(overrides))
