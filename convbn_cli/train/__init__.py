"""Training: the trainer and its event subscribers, optimizers and schedules, tf.distribute. Imports TensorFlow.

Run directories and checkpoints live in `convbn_cli.runs`; evaluation and precise BN in `convbn_cli.model`.
"""

from .loop import Diverged, Interrupted, Trainer, TrainResult, train

__all__ = ["Diverged", "Interrupted", "TrainResult", "Trainer", "train"]
