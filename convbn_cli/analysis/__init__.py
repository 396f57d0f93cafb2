"""After training: evaluate targets, inspect every BN layer's per-channel parameters, recalibrate (precise BN),
diagnose what is wrong with BN (diagnose.py), predict, and draw pictures (plots.py).
Reads runs and targets through `convbn_cli.runs`, never through the training package. Names are imported on
first use: plots.py needs no TensorFlow (`convbn runs compare` draws without loading it); the rest imports it."""

import importlib

_LAZY = {"evaluate": "evaluation", "compare": "inspection", "inspect_bn": "inspection", "recalibrate": "recalibration"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["compare", "evaluate", "inspect_bn", "recalibrate"]
