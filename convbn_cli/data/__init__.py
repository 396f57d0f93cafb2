"""Data: sources and formats (no TensorFlow), and the tf.data input pipeline (`pipeline`, imports TensorFlow)."""

from .formats import DataError
from .sources import DATASETS, cache_dir, cache_path, fetch, info

__all__ = ["DATASETS", "DataError", "cache_dir", "cache_path", "fetch", "info"]
