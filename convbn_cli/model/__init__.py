"""The model and the inference primitives: the builder, per-channel BN (fused kernel or Keras) and the one BN
registry, graph walking, the evaluator, precise BN and BN statistics. Imports TensorFlow."""

from .bn import BN_TYPES, bn_layers, is_bn
from .builder import build_model
from .fused_bn import FusedBatchNorm
from .inference import Evaluator, forward_fn
from .precise_bn import recalibrate_model

__all__ = ["BN_TYPES", "Evaluator", "FusedBatchNorm", "bn_layers", "build_model", "forward_fn", "is_bn",
           "recalibrate_model"]
