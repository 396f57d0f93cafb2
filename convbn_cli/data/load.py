"""The arrays of the dataset a config names, built-in (sources.fetch: verified against the published hashes) or
the user's own (own.load_own: checked against the content hash the run recorded)."""

from __future__ import annotations

import json

from . import sources


def dataset_arrays(cfg, log=print, progress: bool = True) -> dict:
    """x_train, y_train, x_test, y_test (and x_val, y_val for a dataset with a validation split of its own)."""
    if cfg.own is None:  # (looked up at each call: tests stand a stub in for sources.fetch)
        return sources.fetch(cfg.data.dataset, log=log, progress=progress)
    from .own.dataset import for_config

    # files changed since the run read them: refused before anything is decoded (or the cache replaced)
    return for_config(cfg, log=log, progress=progress, expect_hash=cfg.data.about.content_hash).arrays()


def dataset_key(cfg) -> str:
    """One string per set of arrays: what a sweep shares them by. The user's own dataset's arrays depend on how it
    is read (split, resize rule, shape, file limit), which sweeps may vary."""
    if cfg.own is None:
        return cfg.data.dataset
    d = cfg.data
    return json.dumps([cfg.own.format, cfg.own.path, d.test_split, d.resize, d.max_files, cfg.model.input_shape])
