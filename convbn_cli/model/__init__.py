"""The model: a Keras network built from the config, with per-channel BN (fused kernel or Keras)."""

from .builder import bn_layers, build_model
from .fused_bn import FusedBatchNorm

__all__ = ["FusedBatchNorm", "bn_layers", "build_model"]
