"""After training: evaluate targets, inspect every BN layer's per-channel parameters, recalibrate (precise BN),
diagnose what is wrong with BN (diagnose.py), predict, and draw pictures (plots.py).
Reads runs and targets through `convbn_cli.runs`, never through the training package. Names are imported on
first use: plots.py needs no TensorFlow (`convbn runs compare` draws without loading it); the rest imports it."""

from ..lazy import lazy_names

_LAZY = {"evaluate": "evaluation", "compare": "inspection", "inspect_bn": "inspection", "recalibrate": "recalibration"}

__getattr__ = lazy_names(__name__, _LAZY)

__all__ = ["compare", "evaluate", "inspect_bn", "recalibrate"]
