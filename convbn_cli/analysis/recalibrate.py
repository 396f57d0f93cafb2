"""`convbn recalibrate`: precise BN statistics for a trained checkpoint, saved as a new checkpoint."""

from __future__ import annotations

from ..data.pipeline import calibration_batches, eval_dataset
from ..model import Evaluator, recalibrate_model
from ..runs import checkpoint_step
from ..runs.checkpoints import CheckpointError, save_recalibrated
from ..runs.target import open_target


def recalibrate(target, *, which="best", batches: int | None = 200, split=None, data=None, progress=False,
                log=lambda m: None) -> dict:
    """Recalibrate the BN statistics of a checkpoint (precise BN); evaluate before and after; save a new checkpoint.

    Args:
        target: a run directory or checkpoint prefix.
        which: a run directory's checkpoint ("best", "latest", "recalibrated" or a training step).
        batches: training batches to average the statistics over; None: one pass over the training split.
        split: where to report accuracy ("val" or "test"; default val if the run has one).

    Returns:
        source, checkpoint (the new one), split, batches, before/after ({loss, accuracy, ...}), layers
        ({name: (old mean, old var, new mean, new var)}) and source_step.
    """
    t = open_target(target, which)
    if t.run is None or t.kind != "checkpoint":
        raise CheckpointError(f"{t.source}: recalibrate needs a run directory or a checkpoint prefix")
    cfg, splits = t.config, t.splits(data, log, progress)
    split = split or ("val" if splits.size("val") else "test")
    evaluate = Evaluator(t.model, cfg.dataset.num_classes)
    before = evaluate(eval_dataset(splits, cfg, split))
    changes = recalibrate_model(t.model, calibration_batches(splits, cfg, batches), progress=progress)
    after = evaluate(eval_dataset(splits, cfg, split))
    saved = save_recalibrated(t.model, t.run, t.source)
    return {"source": t.source, "checkpoint": saved, "split": split, "batches": batches or "full",
            "before": before, "after": after, "layers": changes, "source_step": checkpoint_step(t.source)}
