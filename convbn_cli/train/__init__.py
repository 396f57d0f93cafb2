"""Training: the trainer and its event subscribers, optimizers and schedules, tf.distribute, and sweeps.

Run directories and checkpoints live in `convbn_cli.runs`; evaluation and precise BN in `convbn_cli.model`.
Names are imported on first use: sweep.py plans and validates a sweep without TensorFlow; the rest imports it.
"""

import importlib

_LAZY = {name: "loop" for name in ("Diverged", "Interrupted", "Trainer", "TrainResult", "train")}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Diverged", "Interrupted", "TrainResult", "Trainer", "train"]
