"""`convbn recalibrate`: precise BN statistics for a trained checkpoint, saved as a new checkpoint."""

from __future__ import annotations

from ..data import fetch
from ..data.pipeline import eval_dataset, make_splits
from ..train.checkpoints import load
from ..train.loop import make_evaluator
from ..train.precise_bn import calibration_batches, recalibrate_model, save_recalibrated
from ..train.rundir import checkpoint_step


def recalibrate(target, *, which="best", batches: int | None = 200, split=None, data=None, progress=False,
                log=lambda m: None) -> dict:
    """Recalibrate the BN statistics of a checkpoint; evaluate before and after; save a new checkpoint."""
    cfg, model, prefix, run = load(target, which)
    if data is None:
        data = fetch(cfg.data.dataset, log=log, progress=progress)
    splits = make_splits(data, cfg)
    split = split or ("val" if splits.size("val") else "test")
    evaluate = make_evaluator(model)
    before = evaluate(eval_dataset(splits, cfg, split))
    changes = recalibrate_model(model, calibration_batches(splits, cfg, batches), progress=progress)
    after = evaluate(eval_dataset(splits, cfg, split))
    saved = save_recalibrated(model, run, prefix)
    return {"source": prefix, "checkpoint": saved, "split": split, "batches": batches or "full",
            "before": before, "after": after, "layers": changes, "source_step": checkpoint_step(prefix)}
