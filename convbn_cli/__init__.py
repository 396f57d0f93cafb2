"""convbn: train conv nets with correct per-channel batch normalization, and look inside every filter's BN.

    from convbn_cli.api import load_config, train, evaluate
    cfg = load_config("configs/mnist_bn.yaml", ["train.epochs=1"])
    result = train(cfg)

The API lives in `convbn_cli.api` (see its docstring). The package re-exports the names of it that no subpackage
shares (all but `train` and `export`, which are the subpackages `convbn_cli.train` and `convbn_cli.export`), on
first use: `import convbn_cli` and `convbn --help` load no TensorFlow.
"""

from .config import ConfigError, load_config
from .lazy import lazy_names
from .version import __version__

_LAZY = {name: "api" for name in ("build_model", "diagnose", "evaluate", "inspect_bn", "predict", "recalibrate")}

__getattr__ = lazy_names(__name__, _LAZY)

__all__ = ["ConfigError", "__version__", "load_config", *_LAZY]
