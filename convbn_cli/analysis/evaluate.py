"""Evaluate a checkpoint (or a run directory, or an exported .keras model) on the validation or test split.

`bn_stats="batch"` normalizes each evaluation batch with its own statistics instead of the moving averages:
what a model does when someone forgets `training=False` (or the moving averages were never updated), shown
side by side with the correct inference mode.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from ..data import fetch
from ..data.pipeline import eval_dataset, make_splits
from ..model import bn_layers
from ..train.checkpoints import CheckpointError, load
from ..train.rundir import RunDir, RunDirError


def load_target(target, which="best"):
    """(cfg, model, description) for a run directory, a checkpoint prefix or an exported .keras file."""
    path = Path(target)
    if path.suffix == ".keras":
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        run_dir = next((p for p in path.resolve().parents if (p / "config.yaml").is_file()), None)
        if run_dir is None:
            raise CheckpointError(f"{path}: no run directory (config.yaml) above this model to say which data it "
                                  "was trained on")
        try:
            cfg = RunDir.open(run_dir).load_config()
            model = keras.saving.load_model(path, safe_mode=True)  # safe_mode: no arbitrary code from the file
        except RunDirError as e:
            raise CheckpointError(str(e)) from None
        except (ValueError, OSError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot load ({' '.join(str(e).split())[:300]})") from None
        return cfg, model, str(path)
    cfg, model, prefix, _ = load(target, which)
    return cfg, model, prefix


def evaluate(target, *, which="best", split="test", bn_stats="moving", data=None, progress=False,
             log=lambda m: None) -> dict:
    """Loss, accuracy, per-class accuracy and confusion matrix of a checkpoint on one split.

    Returns plain data: floats, and NumPy arrays for `per_class_accuracy` (10,) and `confusion` (10, 10),
    rows the true class and columns the predicted one.
    """
    cfg, model, source = load_target(target, which)
    if data is None:
        data = fetch(cfg.data.dataset, log=log, progress=progress)
    splits = make_splits(data, cfg)
    if splits.size(split) == 0:
        raise CheckpointError(f"the run's config holds out no {split} split (data.val_split is 0)")
    # batch mode normalizes with each batch's statistics: use the training batch size, as in training
    batch = cfg.data.batch_size if bn_stats == "batch" else None
    logits, labels = predict(model, eval_dataset(splits, cfg, split, batch), bn_stats, progress,
                             -(-splits.size(split) // (batch or max(cfg.data.batch_size, 500))))
    out = summarize(logits, labels)
    out.update(checkpoint=source, split=split, bn_stats=bn_stats, images=int(len(labels)))
    return out


def predict(model, dataset, bn_stats="moving", progress=False, total=None):
    """Logits and labels for every batch of `dataset`, in order."""
    from tqdm import tqdm

    if bn_stats == "batch":
        forward = _batch_stats_forward(model)
    else:
        forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    logits, labels = [], []
    for x, y in tqdm(dataset, total=total, desc="evaluating", unit="batch", leave=False,
                     disable=None if progress else True):
        logits.append(forward(x).numpy())
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def _batch_stats_forward(model):
    """Run the model in inference mode except that every BN layer uses the batch's own statistics.

    BN layers are called with training=True (dropout stays off); their moving averages, which that call
    updates, are put back afterwards so that the model is left exactly as it was.
    """
    bns = set(id(layer) for layer in bn_layers(model))
    saved = [(v, v.numpy()) for layer in bn_layers(model) for v in (layer.moving_mean, layer.moving_variance)]

    @tf.function(reduce_retracing=True)
    def forward(x):
        # Our models are chains (each layer has one input), so walking the layers in order is the model.
        for layer in model.layers[1:]:
            x = layer(x, training=id(layer) in bns)
        return x

    def run(x):
        out = forward(x)
        for var, value in saved:
            var.assign(value)
        return out

    return run


def summarize(logits, labels, num_classes=10) -> dict:
    pred = logits.argmax(-1)
    # cross-entropy from the logits, computed stably (log-sum-exp)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, pred), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return {"loss": loss, "accuracy": float((pred == labels).mean()), "per_class_accuracy": per_class,
            "confusion": confusion}
