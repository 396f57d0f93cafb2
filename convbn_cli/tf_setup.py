"""Import TensorFlow quietly: its C++ start-up lines (oneDNN, CUDA probing) go to /dev/null unless --verbose.

Only the commands that need TensorFlow call this, so `convbn --help` and `convbn validate` never load it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

VERBOSE = False  # --verbose: nothing of TensorFlow's own output is hidden


@contextlib.contextmanager
def quiet_native():
    """Hide what native code prints straight to file descriptor 2 (TFLite's "Created TensorFlow Lite XNNPACK
    delegate", TensorFlow's C++ start-up lines) and Python's deprecation warnings, unless --verbose. Errors still
    reach the caller as exceptions."""
    if VERBOSE:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow(verbose: bool = False):
    """Import TensorFlow (once) with oneDNN on, silencing its start-up lines unless `verbose`; returns it."""
    if "tensorflow" not in sys.modules:
        # oneDNN's CPU kernels: TensorFlow turns them on by default only on some CPUs (not on AMD's), and
        # without them its CPU Conv2D refuses channels_first (NCHW) outright.
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    global VERBOSE
    VERBOSE = VERBOSE or verbose
    if "tensorflow" in sys.modules or verbose:
        import tensorflow as tf

        return tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Some of TensorFlow's start-up messages are printed by C++ before its log level is read, so
    # TF_CPP_MIN_LOG_LEVEL alone does not silence them: point file descriptor 2 at /dev/null while importing.
    with quiet_native():
        import keras  # noqa: F401  (Keras prints its own notices on first import)
        import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    return tf
