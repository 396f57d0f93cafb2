"""Export: standard Keras models (BN optionally folded into the convolutions, model/fold.py) as .keras, SavedModel
or TFLite. FORMATS needs no TensorFlow (the CLI lists it in --help); `export` loads it on first use."""

from ..lazy import lazy_names
from .output import FORMATS

__getattr__ = lazy_names(__name__, {"export": "formats"})

__all__ = ["FORMATS", "export"]
