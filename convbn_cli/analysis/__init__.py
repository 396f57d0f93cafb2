"""After training: evaluate checkpoints and inspect every BN layer's per-channel parameters."""

from .evaluate import evaluate
from .inspection import compare, inspect_bn

__all__ = ["compare", "evaluate", "inspect_bn"]
