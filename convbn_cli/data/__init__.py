"""Data: the dataset registry, sources and formats (no TensorFlow), and the tf.data input pipeline (`pipeline`,
imports TensorFlow). Names are imported on first use, so that `convbn --help` can read the registry cheaply."""

from ..lazy import lazy_names
from .registry import DATASETS

_LAZY = {"DataError": "formats", "cache_dir": "sources", "cache_path": "sources", "fetch": "sources",
         "info": "sources"}

__getattr__ = lazy_names(__name__, _LAZY)

__all__ = ["DATASETS", "DataError", "cache_dir", "cache_path", "fetch", "info"]
