"""`convbn recalibrate`: precise BN statistics for a trained model, saved as a new checkpoint or .keras file."""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from ..config.schema import PRECISE_BN_BATCHES
from ..data.pipeline import calibrated_on
from ..errors import TargetError
from ..files import staged
from ..formats import runtime
from ..formats.catalog import file_name
from ..model import Evaluator, recalibrate_model
from ..model.fold import standard_model
from ..runs import checkpoint_step
from ..runs.checkpoints import save_recalibrated
from ..runs.target import onnx_file, opened


def recalibrate(target, *, which="best", batches: int | None = PRECISE_BN_BATCHES, split=None, data=None,
                data_source=None,
                scale=1 / 255, progress=False, output=None, force=False, layout=None, augmented: bool | None = None,
                log=lambda m: None) -> dict:
    """Recalibrate the BN statistics of a model (precise BN); evaluate before and after; save the result.

    Args:
        target: a run directory or checkpoint prefix (saved as checkpoints/recalibrated/ckpt-<n>), or a .keras
            model, convbn's export or from anywhere (saved as a new NAME-recalibrated[-k].keras beside it).
        which: a run directory's checkpoint ("best", "latest", "recalibrated", "ema" or a training step).
        batches: training batches to average the statistics over; None: one pass over the training split.
        augmented: True: a run's training batches with its data.augment; False: the same images as they are, as
            inference sees them; None: as the run's train.precise_bn.augmented says, what its training's precise BN
            did (false unless set; true for a run from before that key). A run's model only: a model from
            elsewhere has --data's images, never augmented, and True or False is refused rather than ignored.
        split: where to report accuracy ("val" or "test"; default val if the run has one).
        data: the run's dataset arrays (Keras' mnist.npz layout); fetched when None.
        data_source: for a .keras model from outside convbn: "mnist", "fashion_mnist" or an .npz with x and y
            (see data/external.py); `scale` multiplies its pixels.
        output, force, layout: for an ONNX model (onnx_doctor.recalibrate_onnx): where to write the recalibrated
            model (default NAME-recalibrated.onnx beside it), whether to replace an existing file there, and its
            input layout where the graph does not say.

    Returns:
        source, checkpoint (what was written), split, batches (how many were averaged), augmented (whether they
        were; None where training augmented nothing, or for a model from elsewhere), before/after
        ({loss, accuracy, ...}), layers
        ({name: (old mean, old var, new mean, new var)}) and source_step.
    """
    if onnx_file(target) is not None:
        if augmented is not None:
            raise _augmented_is_for_runs(target, augmented)
        from .onnx_doctor import recalibrate_onnx

        return {**recalibrate_onnx(onnx_file(target), data=data_source, batches=batches, scale=scale,
                                   layout=layout, output=output, force=force, log=log), "augmented": None}
    if output is not None or force:
        raise TargetError("--output and --force are for ONNX models; a Keras model's recalibrated copy goes beside "
                          "it under a free name, a run's into its checkpoints/recalibrated/")
    t = opened(target, which)
    if augmented is not None and t.config is None:
        raise _augmented_is_for_runs(target, augmented)
    d = t.eval_data(batches, split=split, data=data, data_source=data_source, scale=scale, log=log,
                    progress=progress, augmented=augmented)
    evaluate = Evaluator(t.model, d.num_classes)

    def measure():
        return evaluate(tf.data.Dataset.from_tensor_slices((d.images, d.labels)).batch(500), progress)

    before = measure()
    changes = recalibrate_model(t.model, d.calibration, progress=progress)
    after = measure()
    saved = save_recalibrated(t.model, t.run, t.source) if t.kind == "checkpoint" else _save_beside(t)
    return {"source": t.source, "checkpoint": saved, "split": d.split, "batches": changes.batches,
            "augmented": calibrated_on(t.config, augmented) if t.config is not None else None,
            "before": before, "after": after, "layers": changes, "source_step": checkpoint_step(t.source)}


def _augmented_is_for_runs(target, augmented: bool) -> TargetError:
    flag = "--augmented" if augmented else "--unaugmented"
    return TargetError(f"{target}: {flag} (augmented={augmented}) is for a run's model: a model from elsewhere is "
                       "calibrated on --data's images as they are")


def _save_beside(t) -> str:
    """NAME-recalibrated.keras beside NAME.keras (then -2, -3, ...): never over an existing file."""
    path = Path(t.source)
    model = t.model
    if t.pixel_affine is not None:  # the original took raw pixels: so does the recalibrated model
        model = standard_model(t.model, pixel_affine=t.pixel_affine)[0]
    for k in range(1, 10_000):
        out = path.with_name(file_name(f"{path.stem}-recalibrated{'' if k == 1 else f'-{k}'}", "keras"))
        if not (out.exists() or out.is_symlink()):  # a dangling link is someone's too: never replaced
            with staged(out) as tmp:
                runtime.write(model, "keras", tmp, t.about)  # what the original said about itself, it says too
            return str(out)
    raise TargetError(f"{path.parent}: no free name for the recalibrated model")
