"""`convbn eval`: loss, accuracy, per-class accuracy and confusion matrix of a target on one split.

`bn_stats="batch"` normalizes each evaluation batch with its own statistics instead of the moving averages:
what a model does when someone forgets `training=False` (or the moving averages were never updated), shown
side by side with the correct inference mode.
"""

from __future__ import annotations

import numpy as np

from ..data.pipeline import eval_dataset, normalizer
from ..errors import TargetError
from ..model import Evaluator, bn_layers
from ..runs.target import opened

TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # (down, right) in pixels: the image and 4 one-pixel shifts


def tta_predict(predict, background: float, shifts=TTA_SHIFTS):
    """images -> log of the mean softmax over shifted views of each image (test-time augmentation).

    Only shifts: they are what MNIST-like data vary by (digits are not centred exactly) and what training
    augmentation teaches; flips would turn a 2 into something else. The uncovered border gets `background`, the
    normalized value of a black pixel, as the training augmentation fills it.
    """

    def run(x):
        x = np.asarray(x, np.float32)
        padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=background)
        h, w = x.shape[1:3]
        probs = 0.0
        for dy, dx in shifts:
            view = np.ascontiguousarray(padded[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w])
            logits = np.asarray(predict(view), np.float64)
            e = np.exp(logits - logits.max(-1, keepdims=True))
            probs = probs + e / e.sum(-1, keepdims=True)
        return np.log(np.maximum(probs / len(shifts), 1e-30)).astype(np.float32)

    return run


def evaluate(target, *, which="best", split="test", bn_stats="moving", data=None, progress=False,
             log=lambda m: None, tta=False) -> dict:
    """Evaluate a run directory, checkpoint prefix, .keras export or .tflite file on one split.

    Args:
        target: what `convbn eval` takes (see runs.target.open_target), or a Target opened already.
        which: a run directory's checkpoint: "best", "latest", "recalibrated", "ema" or a training step.
        split: "test" or "val".
        bn_stats: "moving" (correct inference) or "batch" (each batch's own statistics).
        data: the dataset arrays (Keras' mnist.npz layout); fetched when None.
        tta: also evaluate with test-time augmentation (`tta_predict`), reported apart under "tta".

    Returns:
        A dict of floats, and NumPy arrays for `per_class_accuracy` (classes,) and `confusion` (classes, classes),
        rows the true class and columns the predicted one; plus checkpoint, split, bn_stats, images, class_names.
    """
    t = opened(target, which, runnable_only=bn_stats == "moving")
    if bn_stats == "batch" and (t.model is None or not bn_layers(t.model)):
        raise TargetError(f"{t.source}: --bn-stats batch needs BN layers and this model has none (folded into "
                              "the convolutions?); its result would be the moving-statistics one")
    splits = t.splits(data, log, progress)
    cfg = t.config
    if splits.size(split) == 0:
        raise TargetError(f"the run's config holds out no {split} split (data.val_split is 0)")
    # batch mode normalizes with each batch's statistics: use the training batch size, as in training
    batch = cfg.data.batch_size if bn_stats == "batch" else None
    size = batch or max(cfg.data.batch_size, 500)
    evaluator = Evaluator(t.model, cfg.dataset.num_classes, bn_stats, forward=None if t.model else t.predict)
    out = evaluator(eval_dataset(splits, cfg, split, batch), progress, total=-(-splits.size(split) // size))
    out.pop("count")
    if tta:
        background = float(np.asarray(normalizer(cfg)(np.zeros((1,), np.float32)))[0])
        aug = Evaluator(None, cfg.dataset.num_classes, forward=tta_predict(t.predict, background))
        r = aug(eval_dataset(splits, cfg, split), progress, total=-(-splits.size(split) // size))
        out["tta"] = {"views": len(TTA_SHIFTS), "loss": r["loss"], "accuracy": r["accuracy"],
                      "what": "mean softmax of the image and its four one-pixel shifts"}
    out.update(checkpoint=t.source, split=split, bn_stats=bn_stats, images=int(out["confusion"].sum()),
               class_names=list(cfg.dataset.class_names))
    return out
