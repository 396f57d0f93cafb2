"""Export: standard Keras models (BN optionally folded into the convolutions, model/fold.py) in every format of
formats/catalog.py, each checked against the original. FORMATS needs no TensorFlow (the CLI lists it in --help);
`export` loads it on first use."""

from ..formats.catalog import FORMATS
from ..lazy import lazy_names

__getattr__ = lazy_names(__name__, {"export": "exporter"})

__all__ = ["FORMATS", "export"]
