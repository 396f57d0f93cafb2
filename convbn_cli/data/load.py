"""The arrays of the dataset a config names, built-in (sources.fetch: verified against the published hashes) or
the user's own (own.load_own: checked against the content hash the run recorded)."""

from __future__ import annotations

from ..errors import DataError
from .sources import fetch


def dataset_arrays(cfg, log=print, progress: bool = True) -> dict:
    """x_train, y_train, x_test, y_test (and x_val, y_val for a dataset with a validation split of its own)."""
    if cfg.own is None:
        return fetch(cfg.data.dataset, log=log, progress=progress)
    from .own.dataset import for_config

    own = for_config(cfg, log=log, progress=progress)
    recorded = cfg.data.about.content_hash
    if own.content_hash != recorded:
        raise DataError(f"data.dataset {cfg.own.path}: its files changed since this run read them (content "
                        f"{own.content_hash[:12]}, the run's {recorded[:12]}); results would be for other images")
    return own.arrays()


def dataset_key(cfg) -> str:
    """One string per dataset: what a sweep shares its arrays by."""
    return cfg.data.dataset if cfg.own is None else f"{cfg.own.format}:{cfg.own.path}"
