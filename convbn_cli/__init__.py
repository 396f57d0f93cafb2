"""convbn: train conv nets with correct per-channel batch normalization, and look inside every filter's BN.

    from convbn_cli import load_config, build_model, train
    cfg = load_config("configs/mnist_bn.yaml", ["train.epochs=1"])
    result = train(cfg)

TensorFlow is imported only when a TF-backed function (everything below but `load_config`) is first used.
"""

from .config import ConfigError, load_config

__version__ = "0.1.0"


def _tf():
    from .tf_setup import import_tensorflow

    import_tensorflow()


def build_model(cfg, plan=None):
    """Build the Keras model a config describes.

    Args:
        cfg: a validated config (`load_config`).
        plan: its layer plan (`convbn_cli.config.plan_layers(cfg)`), if already made.

    Returns:
        A functional keras.Model with per-channel BN, layers named conv1, conv1_bn, conv1_relu, ...
    """
    _tf()
    from .model import build_model as _build

    return _build(cfg, plan)


def train(cfg, **kwargs):
    """Train `cfg` and write a run directory (see convbn_cli.train.loop.train for every argument).

    Args:
        cfg: a validated config.
        **kwargs: data (arrays), resume (a run directory), log, progress, on_step.

    Returns:
        TrainResult with run_dir, metrics, test_loss, test_acc and model.
    """
    _tf()
    from .train import train as _train

    return _train(cfg, **kwargs)


def evaluate(target, **kwargs):
    """Loss, accuracy, per-class accuracy and confusion matrix of a run directory, checkpoint or export.

    Args:
        target: a run directory, checkpoint prefix, .keras export or .tflite file.
        **kwargs: which ("best", "latest", "recalibrated", "ema", a step), split ("test", "val"), bn_stats ("moving",
            "batch"), data, progress, log.

    Returns:
        dict with loss, accuracy, per_class_accuracy, confusion, checkpoint, split, bn_stats, images.
    """
    _tf()
    from .analysis import evaluate as _evaluate

    return _evaluate(target, **kwargs)


def inspect_bn(target, **kwargs):
    """Every BN layer's per-channel gamma, beta, moving mean/variance and inference scale/shift.

    Args:
        target: a run directory, checkpoint prefix or .keras model.
        **kwargs: which, layers (names).

    Returns:
        {"checkpoint": ..., "layers": {name: {quantity: NumPy array, ...}}}.
    """
    _tf()
    from .analysis import inspect_bn as _inspect

    return _inspect(target, **kwargs)


def recalibrate(target, **kwargs):
    """Precise BN: recompute the moving statistics with the final weights; saves a new checkpoint.

    Args:
        target: a run directory or checkpoint prefix.
        **kwargs: which, batches (None: a full pass), split, data, progress, log.

    Returns:
        dict with source, checkpoint (the new one), before and after ({loss, accuracy}), layers.
    """
    _tf()
    from .analysis import recalibrate as _recalibrate

    return _recalibrate(target, **kwargs)


def export(target, fmt="keras", **kwargs):
    """Write a trained model with standard Keras/TensorFlow layers only, checked against the original.

    Args:
        target: a run directory or checkpoint prefix.
        fmt: "keras", "savedmodel" or "tflite".
        **kwargs: fold_bn, output, which, data, check_images, log.

    Returns:
        dict with path, folded and kept BN layers, max_abs_logit_diff and throughputs.
    """
    _tf()
    from .export.formats import export as _export

    return _export(target, fmt, **kwargs)


__all__ = ["ConfigError", "build_model", "evaluate", "export", "inspect_bn", "load_config", "recalibrate", "train",
           "__version__"]
