"""Training: the trainer and its event subscribers, optimizers and schedules, tf.distribute, and sweeps.

Run directories and checkpoints live in `convbn_cli.runs`; evaluation and precise BN in `convbn_cli.model`.
Names are imported on first use: sweep.py plans and validates a sweep without TensorFlow; the rest imports it.
"""

from ..lazy import lazy_names

_LAZY = {name: "loop" for name in ("Diverged", "Interrupted", "Trainer", "TrainResult", "train")}

__getattr__ = lazy_names(__name__, _LAZY)

__all__ = ["Diverged", "Interrupted", "TrainResult", "Trainer", "train"]
