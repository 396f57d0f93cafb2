"""What a user names on the command line (TARGET), opened in one place for every command.

A target is a run directory (its best checkpoint, or the one `--checkpoint` names), a checkpoint prefix, a
convbn `.keras` export (the run directory above it says which data it was trained on), any other Keras 3
`.keras` model (no config: the caller must say which data), or, where the command can run one, a `.tflite` or
`.onnx` file or a SavedModel directory (formats/runtime.py reads each).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import tensorflow as tf

from ..config.schema import PRECISE_BN_BATCHES, Config
from ..data.external import EvalData, external_data
from ..data.load import dataset_arrays
from ..data.pipeline import calibrated_on, calibration_batches, make_splits, normalizer, pixels_of
from ..data.registry import pixel_affine
from ..errors import TargetError
from ..formats import runtime
from ..formats.catalog import format_of
from ..model import build_model
from ..model.fold import NORMALIZE_LAYER, without_preprocessing
from .checkpoints import find, restore, run_of_prefix
from .locate import check_data_of_run, locate
from .rundir import RunDir, RunDirError


@dataclass
class Target:
    """An opened target.

    kind: "checkpoint" (a run's checkpoint), "export" (a convbn .keras export), "external" (a .keras model from
        anywhere, no config), or the format of a file that only runs: "tflite", "onnx", "savedmodel" (model is
        None; `predict` runs it).
    source: the checkpoint prefix or the file.
    config: the run's resolved config (None for an external model).
    model: the Keras model, restored (None for the formats that only run).
    run: the run directory, when there is one.
    predict: images (NumPy, float32, normalized) -> logits; for every kind.
    pixel_affine: for an export that takes raw pixels: its normalization (model is then the network without it,
        taking normalized images like every other target's; what is saved from it gets the normalization back).
    """

    kind: str
    source: str
    config: Optional[Config]
    model: object
    run: Optional[RunDir]
    predict: Callable = None
    pixel_affine: Optional[tuple] = None  # (scale, offset) of an export that normalized raw pixels itself
    about: dict = field(default_factory=dict)  # what an export says about itself (formats/catalog.py)
    signature: Optional[tuple] = None  # ((H, W, C), classes) of an inference-only model (onnx, savedmodel, tflite)
    _arrays: Optional[dict] = field(default=None, repr=False)
    _splits: object = field(default=None, repr=False)

    def arrays(self, data=None, log=lambda m: None, progress=False) -> dict:
        """The dataset arrays the config names (fetched once, on first use), or `data` when given."""
        if data is not None and data is not self._arrays:
            self._arrays, self._splits = data, None
        if self._arrays is None:
            if self.config is None:
                raise TargetError(f"{self.source}: no run directory (config.yaml) above this model to say which "
                                      "data it was trained on")
            self._arrays = dataset_arrays(self.config, log=log, progress=progress)
        return self._arrays

    def splits(self, data=None, log=lambda m: None, progress=False):
        """The run's splits of its data (made once: every measurement of this target shares them)."""
        arrays = self.arrays(data, log, progress)
        if self._splits is None:
            self._splits = make_splits(arrays, self.config)
        return self._splits

    def pixel_contract(self, scale=1 / 255):
        """(input shape (H, W, C), class names, factor, offset): what the model takes is pixels (0-255) x factor +
        offset, as its run's data.normalize says; a model from elsewhere: its own input shape, classes by number,
        and `scale` (--scale)."""
        if self.config is None:
            shape, classes = self.signature or (tuple(self.model.input_shape[1:]), int(self.model.output_shape[-1]))
            names = tuple(self.about.get("class_names") or (str(i) for i in range(classes)))
            if self.about.get("input") == "pixels":  # a convbn export away from its run: raw pixels, as they are
                return tuple(shape), names, 1.0, 0.0
            return tuple(shape), names, scale, 0.0
        cfg = self.config
        return (tuple(cfg.model.input_shape), cfg.dataset.class_names,
                *pixel_affine(cfg.dataset, cfg.data.normalize))

    def eval_data(self, batches: Optional[int], *, split=None, data=None, data_source=None, scale=1 / 255,
                  log=lambda m: None, progress=False, augmented: bool | None = None,
                  as_trained: bool = False) -> EvalData:
        """What to measure this model on and calibrate it with, decided here once for every command.

        A run's model: the images of `split` (default: val if the run has one, else test), normalized as in
        training, and `batches` training batches as precise BN takes them (None: one pass; `augmented`: with
        data.augment or without, None: as train.precise_bn says; `as_trained`: also as training made them, where
        that differs: EvalData.as_trained); its config says which data (`data_source` is for models without one).
        A model from elsewhere: --data's (`data_source`, pixels times `scale`), `batches` batches of 128 of each.
        """
        if self.config is None:
            if data_source is None:
                raise TargetError(f"{self.source}: a model from outside convbn needs --data (mnist, fashion_mnist "
                                      "or an .npz with x and y)")
            # --full (batches None): a model from elsewhere has no training split to pass over
            return external_data(self.model, data_source, batches or PRECISE_BN_BATCHES, scale, log)
        if data_source is not None:  # another dataset would be silently ignored: the run's config says which data
            check_data_of_run(self.source, self.config.dataset_name, data_source)
        cfg, splits = self.config, self.splits(data, log, progress)
        split = split or ("val" if splits.size("val") else "test")
        if splits.size(split) == 0:
            raise TargetError(f"the run's config holds out no {split} split (data.val_split is 0)")
        pixels = getattr(splits, f"x_{split}")
        # streamed: a full pass is the whole training split
        calibration = calibration_batches(splits, cfg, batches, augmented)
        # and as training made them, where they differ (what the moving statistics averaged)
        differ = as_trained and calibrated_on(cfg, augmented) is False
        trained = calibration_batches(splits, cfg, batches, True) if differ else None
        # measured in whole batches (BN's batch statistics need them): a split smaller than one training batch (the
        # user's own small dataset) is one batch of all its images, not zero batches measured as 0% accuracy
        batch = max(2, min(cfg.data.batch_size, splits.size(split)))
        return EvalData(normalizer(cfg)(pixels).numpy(), getattr(splits, f"y_{split}").numpy(), calibration,
                        batch, cfg.dataset.num_classes, split,
                        tf.cast(pixels, tf.float32).numpy(), trained)


def open_target(target, which="best", *, runnable_only=False, layout=None) -> Target:
    """Open TARGET (see the module docstring); `which` chooses a run directory's checkpoint; `runnable_only`: the
    command can also take the formats that only run (eval, predict); `layout`: an ONNX model's input layout
    (--layout NCHW|NHWC) where its graph does not say.

    Raises TargetError (exit 2, one line) for anything that is not a usable target.
    """
    where = locate(target, runnable_only=runnable_only)
    path = where.path
    if layout is not None and where.kind != "onnx":  # only an ONNX graph may leave its input layout unsaid
        raise TargetError(f"{target}: --layout is for ONNX models only (this is a {where.kind}: its input is NHWC)")
    if where.kind not in ("run", "prefix"):
        return _open_file(path, where.kind, layout)
    try:
        if where.kind == "run":
            run = RunDir.open(path)
            prefix = find(run, which)
        else:
            prefix, run = str(path), run_of_prefix(path)
        cfg = run.load_config()
    except RunDirError as e:
        raise TargetError(str(e)) from None
    model = build_model(cfg)
    restore(model, prefix)
    return Target("checkpoint", prefix, cfg, model, run, _keras_predict(model))


def onnx_file(target) -> Path | None:
    """TARGET as an ONNX model file (checked to be one), or None: diagnose, inspect-bn, recalibrate and export open
    it themselves (analysis/onnx_doctor.py, export/onnx_fold.py), where the rest of what they read is Keras'."""
    if isinstance(target, Target) or format_of(Path(target)) != "onnx":
        return None
    return locate(target, runnable_only=True).path


def opened(target, which="best", *, runnable_only=False) -> Target:
    """An opened Target as it is, or TARGET opened (open_target): what the commands take, so that one that measures
    a model several ways (report: eval, inspect-bn, diagnose) builds and restores it once and loads its data once."""
    return target if isinstance(target, Target) else open_target(target, which, runnable_only=runnable_only)


def _open_file(path: Path, fmt: str, layout=None) -> Target:
    """A model file (formats/runtime.py reads it). Under a run directory it must fit the run's data, and every
    command hands it normalized images: an export that takes raw pixels gets them back from the run's
    normalization (a .keras one is opened as its network without the normalization, so that recalibrate, export
    and diagnose work on the network). Away from a run it keeps its own input contract."""
    run, cfg = _run_above(path)
    opened = runtime.read(fmt, path, layout)
    model, predict, affine = opened.model, opened.predict, None
    if cfg is not None:
        _check_fits(path, (None, *opened.shape), (None, opened.classes), cfg)
        if model is not None and opened.takes_pixels:
            norm = model.get_layer(NORMALIZE_LAYER).get_config()
            affine, model = (norm["scale"], norm["offset"]), without_preprocessing(model)
            predict = _keras_predict(model)
        elif opened.takes_pixels:
            predict = runtime.from_pixels(predict, pixels_of(cfg))
    kind = fmt if model is None else ("export" if cfg is not None else "external")
    return Target(kind, str(path), cfg, model, run, predict, pixel_affine=affine, about=opened.about,
                  signature=None if model is not None else (opened.shape, opened.classes))


def _check_fits(path, input_shape, output_shape, cfg) -> None:
    """A model must take the dataset's images and give one logit per class."""
    ds = cfg.dataset
    if not isinstance(input_shape, tuple) or tuple(input_shape[1:]) != tuple(cfg.model.input_shape):
        raise TargetError(f"{path}: takes inputs of shape {input_shape}, but {ds.name} images are "
                              f"{tuple(cfg.model.input_shape)} (the run's model.input_shape)")
    if not isinstance(output_shape, tuple) or tuple(output_shape[1:]) != (ds.num_classes,):
        raise TargetError(f"{path}: gives outputs of shape {output_shape}, but {ds.name} needs {ds.num_classes} "
                              "logits")


def _run_above(path: Path):
    """(run, config) of the run directory above an exported file, or (None, None) for a file from elsewhere."""
    run_dir = next((p for p in path.resolve().parents if (p / "config.yaml").is_file()), None)
    if run_dir is None:
        return None, None
    try:
        run = RunDir.open(run_dir)
        return run, run.load_config()
    except RunDirError as e:
        raise TargetError(str(e)) from None


def _keras_predict(model):
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda x: fn(tf.constant(x)).numpy()
