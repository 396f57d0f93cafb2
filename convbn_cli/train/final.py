"""The run's final model: which weights, BN statistics that do not lag, and one checkpoint that every command opens.

Why this exists: BN's moving averages start at mean 0 / variance 1 and trail the weights. After a short run they
still carry their start, whatever the decay: one epoch of mnist_bn (its 'same'-padded form before issue 40) on 5,000
images (35 steps) ended at 11-21% test accuracy with decay 0.9, 11.35% with 0.99 and 24-37% with 0.999 (3 seeds
each), while the same weights gave 95.1-95.9% with each batch's own statistics (the current net: docs/design.md).
Even 0.9^35 = 2.5% of the initial variance 1 is many times the true variance of a first conv layer's output.
So at the end of training:

1. The final weights are chosen: the EMA of the weights (train.ema), else the best epoch's checkpoint (the best
   validation accuracy as this final model would measure it, train/validation.py: each epoch's weights with
   settled statistics where the moving ones lag; the later of equals), which is what `--checkpoint best` opens.
2. Under mixed precision they are copied into a float32 model, the one eval and export build, so that what is
   calibrated and measured here is what every later command runs.
3. The moving statistics are checked: validation accuracy (or, without a validation split, accuracy on the first
   training images) with the moving statistics against the same images with each batch's own statistics. A gap
   larger than the comparison's noise means the statistics lag.
4. Precise BN (model/precise_bn.py) recomputes them for the final weights: always for the EMA (its weights never ran
   a training step), with `train.precise_bn: always`, and with `auto` (the default) when step 3 found a lag; `auto`
   keeps the result only if it does not lower the moving-statistics accuracy it is judged by. It calibrates on the
   training images as they are (train.precise_bn.augmented: false, the default), not as data.augment changed them:
   inference sees them so, and statistics averaged over strongly augmented images cost accuracy (BENCHMARKS.md).
5. The final model is saved where it belongs (checkpoints/ema/, checkpoints/recalibrated/, or it is the best
   checkpoint itself) and named in results.json ("final_checkpoint"); `--checkpoint best` opens exactly that, so
   the summary's test accuracy is the accuracy of the model the next command opens.

The alternative, a warm-up of the moving average (effective decay min(decay, (1 + t) / (10 + t)), as
tf.train.ExponentialMovingAverage's num_updates), was measured too (bench/short_runs.py --warmup, BENCHMARKS.md
"Short runs"): on those 9 short runs it did as well (within 0.33 points of the batch-statistics accuracy, precise
BN within 0.31). It was not adopted: it adds a counter to every BN layer (checkpoints and exports change), it changes
what `model.bn.decay` means early in training (TF1's meaning is kept exactly), and it does nothing for the EMA's
weights or for statistics that trail weights still moving at the end, which precise BN handles anyway. Precise BN
costs a pass over `train.precise_bn.batches` batches per BN layer, paid only when the statistics lag.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.pipeline import calibrated_on, calibration_batches, eval_dataset
from ..model import Evaluator, build_model, recalibrate_model
from ..model.bn import restore_statistics, snapshot_statistics
from ..runs.checkpoints import restore, save_ema, save_recalibrated

GAP_TRAIN_IMAGES = 5000  # without a validation split, the lag is measured on the first training images
NOISE_FLOOR = 0.002  # never call a gap below 0.2 points material, however many images were compared


@dataclass
class Gap:
    """Accuracy on the same images with the moving BN statistics and with each batch's own."""

    split: str
    moving_acc: float
    batch_acc: float
    count: int

    @property
    def gap(self) -> float:
        return self.batch_acc - self.moving_acc

    @property
    def noise(self) -> float:
        """Two standard errors of the difference of the two accuracies (binomial, as if independent: generous)."""
        n = max(self.count, 1)
        spread = self.moving_acc * (1 - self.moving_acc) + self.batch_acc * (1 - self.batch_acc)
        return max(NOISE_FLOOR, 2.0 * math.sqrt(spread / n))

    @property
    def material(self) -> bool:
        return self.gap > self.noise

    def to_json(self) -> dict:
        return {"split": self.split, "images": self.count, "moving_acc": self.moving_acc,
                "batch_acc": self.batch_acc, "gap": self.gap, "noise": self.noise}


def measure_gap(model, splits, cfg, batch_acc: float | None = None, moving: dict | None = None) -> Gap:
    """The moving-vs-batch statistics comparison; `batch_acc` reuses a batch-statistics accuracy measured before
    (it does not depend on the moving statistics), `moving` an Evaluator's result with the moving statistics on
    the same images (the epoch's validation)."""
    split, limit = ("val", None) if splits.size("val") else ("train", GAP_TRAIN_IMAGES)
    classes = cfg.dataset.num_classes
    if moving is None:
        moving = Evaluator(model, classes)(eval_dataset(splits, cfg, split, limit=limit))
    if batch_acc is None:  # batches of the training size: the statistics training normalized with
        batch_acc = Evaluator(model, classes, "batch")(
            eval_dataset(splits, cfg, split, cfg.data.batch_size, limit=limit))["accuracy"]
    return Gap("validation" if split == "val" else "training", moving["accuracy"], batch_acc, moving["count"])


@dataclass
class FinalModel:
    model: object  # the float32 Keras model to report on
    checkpoint: str  # where it is saved: what `--checkpoint best` opens
    gap: Gap  # its moving-vs-batch statistics check
    test_before: Optional[dict]  # the test result before the EMA or precise BN (None when neither was kept)
    results: dict  # what results.json records of it: bn_statistics, inference_gap, final_checkpoint (ema_val_acc)


def settle(cfg, run, splits, model, optimizer, *, precision: str, latest: str, best: str | None, evaluate_test,
           progress: bool = False) -> FinalModel:
    """Make the run's final model (steps 1-5 of the module docstring) and say what was done (FinalModel.results).

    `model` is the trained model in `precision`; with train.ema its `optimizer` holds the average, which is swapped
    into it. `latest` and `best` are the prefixes of the last epoch's and the best epoch's checkpoints (best None
    when there is none); `evaluate_test(model)` is the test result of a model (loss, accuracy, ...)."""
    precise, ema = cfg.train.precise_bn, cfg.train.ema is not None
    test_before = None
    if ema:
        test_before = evaluate_test(float32_model(model, cfg, precision))  # the raw weights, for comparison
        optimizer.finalize_variable_values(model.trainable_variables)
        source = latest
    else:
        source = best or latest
    final = float32_model(model, cfg, precision)
    if not ema and source != latest:
        restore(final, source)  # the best epoch's weights and statistics, as `--checkpoint best` opens them
    before = measure_gap(final, splits, cfg)
    record = {"mechanism": "none", "split": before.split, "before": before.to_json()}
    prefix, final_gap = source, before
    if ema or (precise is not None and (precise.when == "always" or before.material)):
        record.update(mechanism="ema" if ema else "precise_bn",
                      trigger="train.ema" if ema else f"train.precise_bn: {precise.when}")
        trained_stats = snapshot_statistics(final)
        if not ema:
            test_before = evaluate_test(final)
        n = cfg.train.ema_bn_batches if ema else precise.batches
        changes = recalibrate_model(final, calibration_batches(splits, cfg, n), progress=progress)
        after = measure_gap(final, splits, cfg, batch_acc=before.batch_acc)
        record.update(batches=changes.batches, after=after.to_json(), augmented=calibrated_on(cfg))
        if not ema and precise.when == "auto" and after.moving_acc < before.moving_acc:
            restore_statistics(trained_stats)  # it did not help: the trained statistics stay
            record["kept"], test_before = False, None
        else:
            record["kept"], final_gap = True, after
            prefix = save_ema(final, run, source) if ema else save_recalibrated(final, run, source)
    results = {}
    if final_gap.split == "validation":  # the final model's: what `convbn eval RUN --split val` gives
        results["val_acc"] = final_gap.moving_acc
        if ema:  # (its older name, for choosing a recipe)
            results["ema_val_acc"] = final_gap.moving_acc
    results.update(bn_statistics=record, inference_gap=final_gap.to_json(),
                   final_checkpoint=Path(prefix).resolve().relative_to(run.path.resolve()).as_posix())
    return FinalModel(final, prefix, final_gap, test_before, results)


def float32_model(model, cfg, precision: str):
    """`model`, or under mixed precision (`precision`) a float32 copy of it (what eval and export build): BN
    statistics measured in bfloat16 are ~5e-3 off a float64 reference, in float32 ~6e-5."""
    if precision == "float32":
        return model
    copy = build_model(cfg)
    copy.set_weights(model.get_weights())
    return copy
