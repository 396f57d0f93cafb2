"""After training: evaluate targets, inspect every BN layer's per-channel parameters, recalibrate (precise BN),
diagnose what is wrong with BN (diagnose.py).
Imports TensorFlow; reads runs and targets through `convbn_cli.runs`, never through the training package."""

from .evaluate import evaluate
from .inspection import compare, inspect_bn
from .recalibrate import recalibrate

__all__ = ["compare", "evaluate", "inspect_bn", "recalibrate"]
