"""What a user names on the command line (TARGET), opened in one place for every command.

A target is a run directory (its best checkpoint, or the one `--checkpoint` names), a checkpoint prefix, a
convbn `.keras` export (the run directory above it says which data it was trained on), any other Keras 3
`.keras` model (no config: the caller must say which data), or a `.tflite` file where the command can run one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import keras
import tensorflow as tf

from ..config.schema import Config
from ..data.external import EvalData, external_data
from ..data.pipeline import calibration_batches, make_splits, normalizer, pixels_of
from ..data.registry import pixel_affine
from ..data.sources import fetch
from ..model import build_model
from ..model.fold import NORMALIZE_LAYER, PIXELS_INPUT, takes_pixels, without_preprocessing
from ..tf_setup import quiet_native
from .checkpoints import CheckpointError, find, restore, run_of_prefix
from .exported import onnx_predict, onnx_session, onnx_signature, read_metadata
from .locate import check_keras_archive, locate
from .rundir import RunDir, RunDirError


@dataclass
class Target:
    """An opened target.

    kind: "checkpoint" (a run's checkpoint), "export" (a convbn .keras export), "external" (a .keras model from
        anywhere, no config), or "tflite" (model is None; `predict` runs the interpreter).
    source: the checkpoint prefix or the file.
    config: the run's resolved config (None for an external model).
    model: the Keras model, restored (None for tflite).
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
    about: dict = field(default_factory=dict)  # what an export says about itself (runs/exported.py)
    signature: Optional[tuple] = None  # ((H, W, C), classes) of an inference-only model (onnx, savedmodel, tflite)
    _arrays: Optional[dict] = field(default=None, repr=False)

    def arrays(self, data=None, log=lambda m: None, progress=False) -> dict:
        """The dataset arrays the config names (fetched once, on first use), or `data` when given."""
        if data is not None:
            self._arrays = data
        if self._arrays is None:
            if self.config is None:
                raise CheckpointError(f"{self.source}: no run directory (config.yaml) above this model to say which "
                                      "data it was trained on")
            self._arrays = fetch(self.config.data.dataset, log=log, progress=progress)
        return self._arrays

    def splits(self, data=None, log=lambda m: None, progress=False):
        return make_splits(self.arrays(data, log, progress), self.config)

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
                *pixel_affine(cfg.data.dataset, cfg.data.normalize))

    def eval_data(self, batches: Optional[int], *, split=None, data=None, data_source=None, scale=1 / 255,
                  log=lambda m: None, progress=False) -> EvalData:
        """What to measure this model on and calibrate it with, decided here once for every command.

        A run's model: the images of `split` (default: val if the run has one, else test), normalized as in
        training, and `batches` training batches as training makes them (None: one pass); its config says which
        data (`data_source` is for models without one). A model from elsewhere: --data's (`data_source`, pixels
        times `scale`), `batches` batches of 128 of each.
        """
        if self.config is None:
            if data_source is None:
                raise CheckpointError(f"{self.source}: a model from outside convbn needs --data (mnist, fashion_mnist "
                                      "or an .npz with x and y)")
            return external_data(self.model, data_source, batches or 200, scale, log)  # (--full: 200 batches)
        cfg, splits = self.config, self.splits(data, log, progress)
        split = split or ("val" if splits.size("val") else "test")
        if splits.size(split) == 0:
            raise CheckpointError(f"the run's config holds out no {split} split (data.val_split is 0)")
        pixels = getattr(splits, f"x_{split}")
        calibration = calibration_batches(splits, cfg, batches)  # streamed: a full pass is the whole training split
        return EvalData(normalizer(cfg)(pixels).numpy(), getattr(splits, f"y_{split}").numpy(), calibration,
                        max(cfg.data.batch_size, 2), cfg.dataset.num_classes, split, tf.cast(pixels, tf.float32).numpy())


def open_target(target, which="best", *, tflite=False) -> Target:
    """Open TARGET (see the module docstring); `which` chooses a run directory's checkpoint.

    Raises CheckpointError (exit 2, one line) for anything that is not a usable target.
    """
    where = locate(target, tflite=tflite)
    path = where.path
    if where.kind == "keras":
        return _open_keras(path)
    if where.kind == "tflite":
        return _open_tflite(path)
    if where.kind in ("onnx", "savedmodel"):
        return _open_inference_only(path, where.kind)
    try:
        if where.kind == "run":
            run = RunDir.open(path)
            prefix = find(run, which)
        else:
            prefix, run = str(path), run_of_prefix(path)
        cfg = run.load_config()
    except RunDirError as e:
        raise CheckpointError(str(e)) from None
    model = build_model(cfg)
    restore(model, prefix)
    return Target("checkpoint", prefix, cfg, model, run, _keras_predict(model))


def _open_keras(path: Path) -> Target:
    run, cfg = _run_above(path)
    check_keras_archive(path)  # again (locate did): the file may have changed since
    try:
        model = keras.saving.load_model(path, safe_mode=True)  # safe_mode: no arbitrary code from the file
    except Exception as e:  # noqa: BLE001  a damaged archive fails in many ways (ValueError, KeyError, OSError, ...)
        raise CheckpointError(f"{path}: cannot load ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None
    if cfg is None:
        _check_image_classifier(path, model)
    affine = None
    if cfg is not None:
        if takes_pixels(model):
            # an export that normalizes raw pixels itself is opened as its network: every command feeds it
            # normalized images, as it feeds a checkpoint
            norm = model.get_layer(NORMALIZE_LAYER).get_config()
            affine, model = (norm["scale"], norm["offset"]), without_preprocessing(model)
        _check_fits(path, model.input_shape, model.output_shape, cfg)
    return Target("export" if cfg is not None else "external", str(path), cfg, model, run, _keras_predict(model),
                  pixel_affine=affine, about=read_metadata(path))


def _check_image_classifier(path, model) -> None:
    """A model from elsewhere must be what every command here measures: one input of images of a known size
    (H, W, C), one output of one logit (or probability) per class."""
    inputs, outputs = list(getattr(model, "inputs", None) or []), list(getattr(model, "outputs", None) or [])
    if len(inputs) != 1 or len(outputs) != 1:
        raise CheckpointError(f"{path}: has {len(inputs)} inputs and {len(outputs)} outputs; convbn measures image "
                              "classifiers with one input (N, H, W, C) and one output (N, classes)")
    shape, out = tuple(inputs[0].shape), tuple(outputs[0].shape)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        raise CheckpointError(f"{path}: takes inputs of shape {shape}; convbn needs images of a known size, "
                              "(N, H, W, C)")
    if len(out) != 2 or not isinstance(out[1], int) or out[1] < 2:
        raise CheckpointError(f"{path}: gives outputs of shape {out}; convbn needs one score per class, "
                              "(N, classes) with at least 2 classes")


def _check_fits(path, input_shape, output_shape, cfg) -> None:
    """A model must take the dataset's images and give one logit per class."""
    ds = cfg.dataset
    if not isinstance(input_shape, tuple) or tuple(input_shape[1:]) != tuple(cfg.model.input_shape):
        raise CheckpointError(f"{path}: takes inputs of shape {input_shape}, but {ds.name} images are "
                              f"{tuple(cfg.model.input_shape)} (the run's model.input_shape)")
    if not isinstance(output_shape, tuple) or tuple(output_shape[1:]) != (ds.num_classes,):
        raise CheckpointError(f"{path}: gives outputs of shape {output_shape}, but {ds.name} needs {ds.num_classes} "
                              "logits")


def _open_tflite(path: Path) -> Target:
    run, cfg = _run_above(path)
    try:
        interpreter = open_interpreter(path)
    except (ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable TFLite model ({' '.join(str(e).split())[:300]})") from None
    predict = tflite_predict(interpreter)
    signature = (tuple(int(d) for d in interpreter.get_input_details()[0]["shape"][1:]),
                 int(interpreter.get_output_details()[0]["shape"][-1]))
    if cfg is not None and PIXELS_INPUT in interpreter.get_input_details()[0]["name"]:
        # it takes raw pixels (exported with its preprocessing): callers hand every target normalized images
        to_pixels, raw = pixels_of(cfg), predict
        predict = lambda x: raw(to_pixels(x).numpy())  # noqa: E731
    return Target("tflite", str(path), cfg, None, run, predict, signature=signature)


def _open_inference_only(path: Path, kind: str) -> Target:
    """An ONNX model (onnxruntime) or a SavedModel directory (its serving function): what eval and predict run.
    An export that takes raw pixels gets them, from normalized images when its run directory is above it (as
    every target is handed normalized images then), else as predict reads them (its metadata says so)."""
    run, cfg = _run_above(path)
    if kind == "onnx":
        session = onnx_session(path)  # loaded once: its signature, its metadata and the predictions
        shape, classes, name = onnx_signature(session, path)
        predict, takes_raw, about = onnx_predict(session), PIXELS_INPUT in name, read_metadata(path, session)
    else:
        about = read_metadata(path)
        try:
            loaded = tf.saved_model.load(str(path))
            serve = loaded.signatures["serving_default"]
        except Exception as e:  # noqa: BLE001  a damaged SavedModel fails in many ways
            raise CheckpointError(f"{path}: not a readable SavedModel ({' '.join(str(e).split())[:200]})") from None
        spec = next(iter(serve.structured_input_signature[1].values()))
        out = next(iter(serve.structured_outputs.values()))
        if len(spec.shape) != 4 or None in spec.shape[1:] or len(out.shape) != 2:
            raise CheckpointError(f"{path}: takes {spec.shape} and gives {out.shape}; convbn needs (N, H, W, C) "
                                  "images and (N, classes)")
        shape, classes, takes_raw = tuple(spec.shape[1:]), int(out.shape[1]), PIXELS_INPUT in (spec.name or "")
        predict = lambda x: loaded.serve(tf.constant(x)).numpy()  # noqa: E731
    if about.get("input"):
        takes_raw = about["input"] == "pixels"
    if cfg is not None:
        _check_fits(path, (None, *shape), (None, classes), cfg)
        if takes_raw:
            to_pixels, raw = pixels_of(cfg), predict
            predict = lambda x: raw(to_pixels(x).numpy())  # noqa: E731
    return Target(kind, str(path), cfg, None, run, predict, about=about, signature=(shape, classes))


def open_interpreter(path):
    """A TFLite interpreter with its tensors allocated, without the deprecation warning and the XNNPACK notice
    it prints (shown with --verbose)."""
    with quiet_native():
        interpreter = tf.lite.Interpreter(model_path=str(path))
        interpreter.allocate_tensors()
    return interpreter


def _run_above(path: Path):
    """(run, config) of the run directory above an exported file, or (None, None) for a file from elsewhere."""
    run_dir = next((p for p in path.resolve().parents if (p / "config.yaml").is_file()), None)
    if run_dir is None:
        return None, None
    try:
        run = RunDir.open(run_dir)
        return run, run.load_config()
    except RunDirError as e:
        raise CheckpointError(str(e)) from None


def _keras_predict(model):
    fn = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    return lambda x: fn(tf.constant(x)).numpy()


def tflite_predict(interpreter):
    """images -> logits through a TFLite interpreter, resizing its input to each batch."""

    def run(x):
        inp = interpreter.get_input_details()[0]
        if tuple(inp["shape"]) != x.shape:
            interpreter.resize_tensor_input(inp["index"], x.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])

    return run
