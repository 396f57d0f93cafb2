"""Run directories and targets: the layout of `runs/<name>/<n>/`, its numbering, config, metrics and
checkpoints, and `open_target`, the one reader of what users name on the command line.

`rundir` and `resume` need no TensorFlow; `checkpoints` and `target` import it. Names are imported on first use.
"""

from ..lazy import lazy_names

CHECKPOINT_CHOICES = ("best", "latest", "recalibrated", "ema")  # `--checkpoint`: one of these, or a training step

_LAZY = {"Resume": "resume", "open_for_resume": "resume", "RunDir": "rundir", "RunDirError": "rundir",
         "checkpoint_step": "rundir"}

__getattr__ = lazy_names(__name__, _LAZY)

__all__ = ["CHECKPOINT_CHOICES", "Resume", "RunDir", "RunDirError", "checkpoint_step", "open_for_resume"]
