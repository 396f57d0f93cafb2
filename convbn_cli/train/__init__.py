"""Training: the loop, optimizers and schedules, and the run directory it writes."""

from .loop import Diverged, Interrupted, TrainResult, make_evaluator, train
from .rundir import RunDir, RunDirError

__all__ = ["Diverged", "Interrupted", "RunDir", "RunDirError", "TrainResult", "make_evaluator", "train"]
