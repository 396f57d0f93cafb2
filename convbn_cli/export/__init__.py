"""Export: standard Keras models (BN optionally folded into the convolutions) as .keras, SavedModel or TFLite.

FORMATS needs no TensorFlow (the CLI lists it in --help); `export` and `standard_model` import it when called.
"""

FORMATS = ("keras", "savedmodel", "tflite")


def export(*args, **kwargs):
    from .formats import export as _export

    return _export(*args, **kwargs)


def standard_model(*args, **kwargs):
    from .fold import standard_model as _standard_model

    return _standard_model(*args, **kwargs)


export.__doc__ = "See convbn_cli.export.formats.export (imports TensorFlow when called)."
standard_model.__doc__ = "See convbn_cli.export.fold.standard_model (imports TensorFlow when called)."
__all__ = ["FORMATS", "export", "standard_model"]
