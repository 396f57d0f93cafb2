"""After training: evaluate targets, inspect every BN layer's per-channel parameters, recalibrate (precise BN),
diagnose what is wrong with BN (diagnose.py), predict (predict.py), and a run's or sweep's HTML page (report.py).
Each takes a TARGET or a Target opened already (runs/target.py), never the training package. Names are imported on
first use; the pictures are drawn by present/ (no TensorFlow)."""

from ..lazy import lazy_names

_LAZY = {"evaluate": "evaluation", "compare": "inspection", "inspect_bn": "inspection", "recalibrate": "recalibration"}

__getattr__ = lazy_names(__name__, _LAZY)

__all__ = ["compare", "evaluate", "inspect_bn", "recalibrate"]
