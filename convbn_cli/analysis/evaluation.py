"""`convbn eval`: loss, accuracy, per-class accuracy and confusion matrix of a target on one split.

`bn_stats="batch"` normalizes each evaluation batch with its own statistics instead of the moving averages:
what a model does when someone forgets `training=False` (or the moving averages were never updated), shown
side by side with the correct inference mode.
"""

from __future__ import annotations

from ..data.pipeline import eval_dataset
from ..model import Evaluator, bn_layers
from ..runs.checkpoints import CheckpointError
from ..runs.target import open_target


def evaluate(target, *, which="best", split="test", bn_stats="moving", data=None, progress=False,
             log=lambda m: None) -> dict:
    """Evaluate a run directory, checkpoint prefix, .keras export or .tflite file on one split.

    Args:
        target: what `convbn eval` takes (see runs.target.open_target).
        which: a run directory's checkpoint: "best", "latest", "recalibrated" or a training step.
        split: "test" or "val".
        bn_stats: "moving" (correct inference) or "batch" (each batch's own statistics).
        data: the dataset arrays (Keras' mnist.npz layout); fetched when None.

    Returns:
        A dict of floats, and NumPy arrays for `per_class_accuracy` (classes,) and `confusion` (classes, classes),
        rows the true class and columns the predicted one; plus checkpoint, split, bn_stats, images, class_names.
    """
    t = open_target(target, which, tflite=bn_stats == "moving")
    if bn_stats == "batch" and not bn_layers(t.model):
        raise CheckpointError(f"{t.source}: --bn-stats batch needs BN layers and this model has none (folded into "
                              "the convolutions?); its result would be the moving-statistics one")
    splits = t.splits(data, log, progress)
    cfg = t.config
    if splits.size(split) == 0:
        raise CheckpointError(f"the run's config holds out no {split} split (data.val_split is 0)")
    # batch mode normalizes with each batch's statistics: use the training batch size, as in training
    batch = cfg.data.batch_size if bn_stats == "batch" else None
    size = batch or max(cfg.data.batch_size, 500)
    evaluator = Evaluator(t.model, cfg.dataset.num_classes, bn_stats, forward=None if t.model else t.predict)
    out = evaluator(eval_dataset(splits, cfg, split, batch), progress, total=-(-splits.size(split) // size))
    out.pop("count")
    out.update(checkpoint=t.source, split=split, bn_stats=bn_stats, images=int(out["confusion"].sum()),
               class_names=list(cfg.dataset.class_names))
    return out
