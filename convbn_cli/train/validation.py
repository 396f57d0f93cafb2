"""Each epoch's validation as the run's final model will measure it: with BN statistics that do not lag.

Why: the final model is the best epoch's weights with precise BN where the moving statistics lag (final.py). Judged
with the moving statistics, a short run's epochs all read chance: 2 epochs on 6,000 MNIST images gave 11.17%
validation at both, the tie kept epoch 1, and its weights with precise BN gave 96.50% where epoch 2's gave 97.67%.
The epoch was chosen by noise and every summary showed 11% beside a 96% test accuracy.

So after each epoch's validation with the moving statistics, when the final model would be settled by precise BN
(train.precise_bn not off, no train.ema: the EMA's final model is not an epoch's weights):

1. with `precise_bn: auto`, validation with each batch's own statistics (batches of the training size), the
   comparison final.py makes; with `always` none (final.py settles the final model whatever it would say);
2. with `always`, or if the moving statistics lose by more than step 1's noise (final.Gap.material): an in-memory
   precise BN of the epoch's weights over the first EPOCH_BATCHES of the batches the final precise BN uses,
   validation again, and every non-trainable BN variable put back (the moving statistics, renorm's), so that
   training, the checkpoint and a resume continue exactly as without it;
3. the row's val_acc / val_loss are then what the final model would measure (the settled figures; with
   `precise_bn: auto` only where they are not worse, as final.settle keeps them), val_*_moving the moving ones,
   val_acc_batch the batch-statistics accuracy (where step 1 measured it), val_bn which statistics val_acc used,
   settle_s what it cost.

Cost (each row's settle_s), measured on this project's 2-core CPU shared with other jobs: mnist_bn (5 BN layers) on
6,000 images, 2 epochs of 42 steps of 128: 4.0 s and 3.3 s for steps 1-2 beside epochs of 14.2 s and 7.7 s (load
average 7; with 10 batches and a lighter load, 2.2 s and 2.8 s beside 8.2 s and 5.6 s). Most of it is fixed: one
pass per BN layer over EPOCH_BATCHES batches, compiling each layer's function, and two passes over the 600 validation
images; it does not grow with the training set, so a longer epoch pays a smaller share. Under `auto`, a run whose
statistics do not lag (a long one) pays step 1 only, one more pass over the validation split; under `always` every
epoch pays step 2 and none pays step 1. The settled figure is an estimate
over EPOCH_BATCHES batches (on that run 96.33% and 97.50%; the final model, over all 42, 97.67%); the final model's
own (results.json's val_acc, over train.precise_bn.batches) is the one every summary shows, and what `convbn eval
RUN --split val` gives.
"""

from __future__ import annotations

import time

from ..data.pipeline import calibration_batches, eval_dataset
from ..model import Evaluator, bn_layers, recalibrate_model
from ..model.bn import restore_statistics, snapshot_statistics
from .final import measure_gap

EPOCH_BATCHES = 8  # training batches of each epoch's in-memory precise BN (fewer when train.precise_bn says so)


def unvalidated() -> dict:
    """A row's validation fields without a validation split."""
    return {"val_loss": None, "val_acc": None}


def validation_fields(model, splits, cfg, moving: dict, evaluate) -> dict:
    """The epoch's validation fields of its metrics row (see the module docstring) from `moving`, the validation
    result with the moving statistics; `evaluate` is the model's validation Evaluator (its compiled forward is
    reused)."""
    fields = {"val_loss": moving["loss"], "val_acc": moving["accuracy"], "val_loss_moving": moving["loss"],
              "val_acc_moving": moving["accuracy"], "val_bn": "moving"}
    precise = cfg.train.precise_bn
    if precise is None or cfg.train.ema is not None or not bn_layers(model):
        return fields  # the final model keeps the moving statistics (or is not an epoch's weights)
    started = time.monotonic()
    # under `always` the final model is settled whatever the gap (final.settle), so every epoch is, and the
    # batch-statistics pass that would only decide whether to settle is not made
    settle = precise.when == "always"
    if not settle:
        gap = measure_gap(model, splits, cfg, moving=moving)
        fields["val_acc_batch"], settle = gap.batch_acc, gap.material
    if settle:
        settled = settled_validation(model, splits, cfg, min(precise.batches, EPOCH_BATCHES), evaluate)
        if precise.when == "always" or settled["accuracy"] >= moving["accuracy"]:
            fields.update(val_loss=settled["loss"], val_acc=settled["accuracy"], val_bn="precise_bn")
    fields["settle_s"] = time.monotonic() - started
    return fields


def settled_validation(model, splits, cfg, batches: int, evaluate=None) -> dict:
    """Validation of `model` with its BN statistics recomputed over `batches` training batches (precise BN), the
    statistics it had put back afterwards, whatever happens in between."""
    saved = snapshot_statistics(model)
    try:
        recalibrate_model(model, calibration_batches(splits, cfg, batches))
        evaluate = evaluate or Evaluator(model, cfg.dataset.num_classes)
        return evaluate(eval_dataset(splits, cfg, "val"))
    finally:
        restore_statistics(saved)
