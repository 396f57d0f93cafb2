"""Configs: the YAML schema, overrides, validation and the layer plan (no TensorFlow here)."""

from ..errors import ConfigError
from .loader import apply_overrides, dump_config, load_config, read_yaml
from .plan import PlannedLayer, layer_table, plan_layers
from .schema import BNSettings, Config

__all__ = ["BNSettings", "Config", "ConfigError", "PlannedLayer", "apply_overrides", "dump_config", "layer_table",
           "load_config", "plan_layers", "read_yaml"]
