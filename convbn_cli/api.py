"""convbn's Python API: the functions the `convbn` commands are thin over, with their real signatures and
docstrings, because they are those functions. Importing this module loads TensorFlow (set up by tf_setup).

    from convbn_cli.api import load_config, train, evaluate
    result = train(load_config("mnist_bn", ["train.epochs=1"]))
    evaluate(result.run_dir)["accuracy"]

A module, not a package: none of these names can be replaced by a subpackage of the same name (importing
`convbn_cli.train` sets the package's attribute `train` to that subpackage; `convbn_cli.api.train` stays the
function). The package re-exports the names that no subpackage shares, lazily (convbn_cli/__init__.py).
"""

from .tf_setup import import_tensorflow

import_tensorflow()  # before Keras is first imported: convbn's TensorFlow settings (oneDNN, quiet start-up)

from .analysis.diagnose import diagnose  # noqa: E402
from .analysis.evaluation import evaluate  # noqa: E402
from .analysis.inspection import inspect_bn  # noqa: E402
from .analysis.predict import predict  # noqa: E402
from .analysis.recalibration import recalibrate  # noqa: E402
from .config import ConfigError, load_config  # noqa: E402
from .export.exporter import export  # noqa: E402
from .model import build_model  # noqa: E402
from .train.loop import TrainResult, train  # noqa: E402

__all__ = ["ConfigError", "TrainResult", "build_model", "diagnose", "evaluate", "export", "inspect_bn", "load_config",
           "predict", "recalibrate", "train"]
