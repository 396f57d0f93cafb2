"""convbn: train conv nets with correct per-channel batch normalization, and look inside every filter's BN.

    from convbn_cli import load_config, build_model, train
    cfg = load_config("configs/mnist_bn.yaml", ["train.epochs=1"])
    result = train(cfg)

TensorFlow is imported only when build_model/train (or another TF-backed function) is first used.
"""

from .config import ConfigError, load_config

__version__ = "0.1.0"


def build_model(cfg, plan=None):
    from .tf_setup import import_tensorflow

    import_tensorflow()
    from .model import build_model as _build

    return _build(cfg, plan)


def train(cfg, **kwargs):
    from .tf_setup import import_tensorflow

    import_tensorflow()
    from .train import train as _train

    return _train(cfg, **kwargs)


__all__ = ["ConfigError", "build_model", "load_config", "train", "__version__"]
