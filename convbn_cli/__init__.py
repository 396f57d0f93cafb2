"""convbn: train conv nets with correct per-channel batch normalization, and look inside every filter's BN.

    from convbn_cli.api import load_config, train, evaluate
    cfg = load_config("configs/mnist_bn.yaml", ["train.epochs=1"])
    result = train(cfg)

The API lives in `convbn_cli.api` (see its docstring). The package re-exports the names of it that no subpackage
shares (all but `train` and `export`, which are the subpackages `convbn_cli.train` and `convbn_cli.export`), on
first use: `import convbn_cli` and `convbn --help` load no TensorFlow.
"""

from .errors import ConfigError
from .lazy import lazy_names
from .version import __version__

# load_config too: the config schema loads pydantic (a quarter of a second), and `python -m convbn_cli` and the
# `convbn` executable run this module before __main__.py's signal handlers can be installed
_LAZY = {"load_config": "config",
         **{name: "api" for name in ("build_model", "diagnose", "evaluate", "inspect_bn", "predict", "recalibrate")}}

__getattr__ = lazy_names(__name__, _LAZY)

__all__ = ["ConfigError", "__version__", "load_config", *_LAZY]
