"""Data: the dataset registry, sources and formats (no TensorFlow), and the tf.data input pipeline (`pipeline`,
imports TensorFlow). Names are imported on first use, so that `convbn --help` can read the registry cheaply."""

import importlib

from .registry import DATASETS

_LAZY = {"DataError": "formats", "cache_dir": "sources", "cache_path": "sources", "fetch": "sources",
         "info": "sources"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DATASETS", "DataError", "cache_dir", "cache_path", "fetch", "info"]
