"""Optimizer settings of the config reach the Keras optimizer (train/optim.py)."""

from __future__ import annotations

import pytest

from conftest import tiny_raw
from convbn_cli.config import ConfigError, load_config


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_betas_are_config_keys_that_reach_the_optimizer(tmp_path, name):
    from convbn_cli.train.optim import make_optimizer

    given = load_config(raw=tiny_raw(tmp_path, **{"train.optimizer": {"name": name, "beta_1": 0.7, "beta_2": 0.9}}))
    opt = make_optimizer(given.train, 10)
    assert (float(opt.beta_1), float(opt.beta_2)) == (0.7, 0.9)
    default = make_optimizer(load_config(raw=tiny_raw(tmp_path, **{"train.optimizer": {"name": name}})).train, 10)
    assert (float(default.beta_1), float(default.beta_2)) == (0.9, 0.999)  # Keras' defaults, as before
    with pytest.raises(ConfigError, match=r"train.optimizer.beta_2: must be in \[0, 1\), got 1"):
        load_config(raw=tiny_raw(tmp_path, **{"train.optimizer": {"name": name, "beta_2": 1.0}}))
