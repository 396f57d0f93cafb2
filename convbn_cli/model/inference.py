"""Running a trained model: the one evaluator (training's validation, `convbn eval`, recalibrate and the
benchmarks all use it), and the batch-statistics forward.

The loss is plain cross-entropy (no label smoothing), so validation and test losses compare across configs.
`bn_stats="batch"` normalizes each batch with its own statistics instead of the moving averages: what a model
does when someone forgets `training=False` (or the moving averages were never updated).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from .bn import is_bn, restore_statistics, snapshot_statistics
from .graph import run_graph


def forward_fn(model, bn_stats: str = "moving"):
    """A compiled function images -> logits in inference mode; with bn_stats="batch", BN layers use each
    batch's own statistics (dropout stays off), and their non-trainable variables (moving averages, renorm's) are
    put back after every call so that the model is left exactly as it was (bn.snapshot_statistics)."""
    if bn_stats == "moving":
        return tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    saved = snapshot_statistics(model)
    forward = tf.function(lambda x: run_graph(model, x, is_bn), reduce_retracing=True)

    def run(x):
        out = forward(x)
        restore_statistics(saved)
        return out

    return run


@tf.function(reduce_retracing=True)
def _loss_and_prediction(logits, y):
    """The batch's summed cross-entropy (float64) and its predicted classes, computed on the device."""
    logits = tf.cast(logits, tf.float32)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.cast(y, tf.int32), logits)
    return tf.reduce_sum(tf.cast(losses, tf.float64)), tf.argmax(logits, -1, tf.int32)


class Evaluator:
    """evaluator(dataset) -> {loss, accuracy, count, per_class_accuracy, confusion} over (images, labels) batches.

    Only each batch's summed loss and predicted classes come back to the host, where the confusion matrix
    (rows: true class, columns: predicted) is accumulated.
    """

    def __init__(self, model, num_classes: int, bn_stats: str = "moving", forward=None):
        """forward: a NumPy function images -> logits to use instead of the model (e.g. a TFLite interpreter)."""
        self.num_classes = num_classes
        if forward is not None:
            self._logits = lambda x: forward(x.numpy())
        else:
            self._logits = forward_fn(model, bn_stats)

    def __call__(self, dataset, progress: bool = False, total: int | None = None) -> dict:
        confusion = np.zeros((self.num_classes, self.num_classes), np.int64)
        loss = 0.0
        for x, y in tqdm(dataset, total=total, desc="evaluating", unit="batch", leave=False,
                         disable=None if progress else True):
            batch_loss, pred = _loss_and_prediction(self._logits(x), y)
            loss += float(batch_loss)
            np.add.at(confusion, (np.asarray(y), pred.numpy()), 1)
        count = int(confusion.sum())
        return {"loss": loss / max(count, 1), "accuracy": float(confusion.trace()) / max(count, 1), "count": count,
                "per_class_accuracy": confusion.diagonal() / np.maximum(confusion.sum(1), 1),
                "confusion": confusion}
