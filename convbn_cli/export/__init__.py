"""Export: standard Keras models (BN optionally folded into the convolutions) as .keras, SavedModel or TFLite."""

from .fold import standard_model
from .formats import FORMATS, export

__all__ = ["FORMATS", "export", "standard_model"]
